"""firecracker-sim: a stand-in for the Firecracker v1.14.2 binary that serves its API for real.

Started exactly like Firecracker (`firecracker-sim --api-sock PATH [--id ID]
[--level L] [--log-path P] [--metrics-path P] [--config-file F] [--no-seccomp]
[--seccomp-filter F] [--boot-timer] ...`), it serves Firecracker's HTTP/1.1 API
on the Unix socket with the same paths, bodies, status codes, `fault_message`
texts, headers and pre-/post-boot state machine, matched against recorded
exchanges with the real binary. It runs no guest code; what it simulates:

Console (stdout, which an agent sends to the VM's console log). Firecracker's
own log lines go there until PUT /logger sets a log path. At InstanceStart the
simulated guest writes two lines on its serial console:

    [    0.000000] Command line: <kernel command line, with Firecracker's root= part>
    GUEST-READY

`GUEST-READY` is the readiness marker. PUT /serial redirects these lines to a file.
A Linux guest (below) given `root=` without a root drive or initrd panics instead
and, with `panic=N`, reboots N seconds later, which ends the process (see guest).

Kernel image. InstanceStart refuses an image that does not start with the ELF
magic, with Firecracker's loader error. SendCtrlAltDel goes to the guest through
the emulated i8042 keyboard: if the kernel image contains the bytes `i8042`
(a Linux kernel with the i8042 driver, as Debian's and Firecracker's guest
kernels are), the guest reboots about 0.1 s after the 204 answer, and, as
Firecracker exits when its guest reboots, the process prints
`reboot: Restarting system` on the console, logs "Vmm is stopping." and exits
with status 0. Any other image ignores the keystroke and keeps running. A
paused guest handles the keystroke when resumed.

Metrics. With PUT /metrics (or --metrics-path), one JSON line per write in
Firecracker's layout (`block_<drive_id>` per drive, `net_<iface_id>` per
interface, deltas since the previous line): at InstanceStart or snapshot load,
on FlushMetrics, and every 60 s (FIRECRACKER_SIM_METRICS_PERIOD_S overrides the
period). Counters that the simulation produces are real (API requests, console
bytes, pause/resume/snapshot latencies, drive updates); device I/O stays 0.

Snapshots. PUT /snapshot/create (paused VMs only) writes a state file with
Firecracker's header and the simulator's own state, and a sparse memory file of
the guest memory size. A fresh process loads it with PUT /snapshot/load; a
failed load answers, then exits with status 1, as Firecracker does.

Process. SIGTERM and SIGINT kill the process by the signal, as they kill
Firecracker (which installs no handler for them); SIGHUP exits with status 156.
Like Firecracker, it never removes the API socket file, and refuses to start
(status 1) when that path already exists.

`python -m tools.simulators.firecracker` works as well as the console script.
"""
