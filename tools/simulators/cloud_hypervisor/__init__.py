"""An API-faithful simulator of Cloud Hypervisor v53.0, started like the real binary.

    cloud-hypervisor-sim --api-socket path=/run/vm/api.sock [--no-shutdown]
                         [-v] [--log-file PATH] [--seccomp VALUE]

It serves Cloud Hypervisor's HTTP API (HTTP/1.1 on a Unix socket, routes under
/api/v1) with the real routes, status codes, bodies and state machine, as read
from `vmm/src/api/http/*.rs`, `vmm/src/lib.rs`, `vmm/src/vm.rs` and
`vmm/src/config.rs` at tag v53.0. What it models, as Cloud Hypervisor does:

* Errors are a JSON array of strings, the error chain outermost first:
  400 ["Failed to deserialize JSON", <serde message>] for a bad body; 400
  ["Bad Request"] for a method a route does not take (an empty 400 for PATCH on
  an action route); 404 ["Not Found"] for an unknown route; 404 when the VM has
  no config (VmNotCreated / VmMissingConfig); 429 ["Too Many Requests"] for
  vm.resize while a vCPU removal is pending; 500 for every other API error.
* vm.create only deserialises and stores the config and opens the serial
  output. Validation (payload, boot_vcpus <= max_vcpus, identifiers, topology,
  ...) and opening the disks, initramfs and kernel happen at vm.boot, so those
  errors come from vm.boot. Unknown fields are ignored, as serde does for
  Cloud Hypervisor's config structs (none denies unknown fields); `cpus` and
  `memory` default to 1 vCPU and 512 MiB, but inside them `boot_vcpus`,
  `max_vcpus` and `size` are required.
* vm.boot builds the VM (Vm::new: validation, devices, disks opened and their
  image type detected from the header: QCOW2 magic, fixed-VHD footer, VHDX
  signature, else raw; a declared `image_type` that differs is refused), then
  boots it (Vm::boot: an advisory OFD lock on every disk image, a write lock
  for a writable one and a read lock for a read-only one; then the initramfs
  and kernel are loaded). A failure while building leaves no VM; a failure
  while booting leaves the built VM "Created", and every later vm.boot answers
  500 "VM is already created" until vm.shutdown or vm.delete drops it.
* vm.shutdown, and a guest power-off under --no-shutdown, drop the VM but keep
  its config and the VMM: vm.info then reports "Created" again (Cloud
  Hypervisor v53.0 never shows "Shutdown" there) and vm.boot boots it anew.
  Without --no-shutdown a guest power-off ends the VMM process (status 0).
* Serial output mode File recreates (truncates) its file at vm.create, at each
  boot after a shutdown and at vm.reboot, like Cloud Hypervisor's File::create;
  mode Tty writes to the simulator's stdout.

The simulated guest:

* at each boot it prints `[    0.000000] Command line: <cmdline>` and then the
  readiness line `GUEST-READY` on the serial port, and reads the first 4 KiB of
  each disk (so vm.counters shows real reads);
* on vm.power-button it prints `reboot: Power down` and powers off shortly
  after, unless its kernel command line contains `acpi=off`: such a guest has
  no ACPI and ignores the power button, as a real Linux guest does;
* a vCPU removal (vm.resize to fewer vCPUs) stays pending for
  $CLOUD_HYPERVISOR_SIM_VCPU_UNPLUG_SECONDS seconds (default 0.2), the time the
  guest takes to eject the vCPUs; vm.resize of the vCPUs meanwhile gets 429. A
  guest booted with `acpi=off` has no CPU hotplug and never ejects them: every
  later vCPU resize gets 429.

The process: `--log-file` is created anew (truncated) at each start and gets
the API requests only with -v (they are info; without -v Cloud Hypervisor logs
warnings only). `--gdb` exists only in builds with the guest_debug feature: the
simulator refuses it, as a default release build does ("unexpected argument"),
unless CLOUD_HYPERVISOR_SIM_GUEST_DEBUG=1, which also adds "guest_debug" to
vmm.ping's features. A serial or console in mode File without a file makes
vm.create panic the VMM: the process ends without answering. The API is served
with micro_http's framing and limits (tools.simulators.micro_http): bodies over
51,200 bytes are refused, and at most 10 connections are served at once.

Not modelled: TAP devices and vhost-user back-ends are not opened, hugepages
are not allocated, Pty/Socket serial modes behave like Null, and the routes for
snapshots, migration, fs/pmem/vsock/vdpa/VFIO devices and zone/disk resizing
exist but answer 500 with a chain that says the simulator does not implement
them. serde's "line L column C" positions point at the end of the offending
value (or of the enclosing object for a missing field); for JSON syntax errors
they are approximate.

`python -m tools.simulators.cloud_hypervisor` works as well as the console script.
"""
