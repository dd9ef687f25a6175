"""cloud-hypervisor-sim's command line, and `main`, the console script's entry point."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tools.simulators.cloud_hypervisor import events
from tools.simulators.cloud_hypervisor.errors import os_error_text
from tools.simulators.cloud_hypervisor.http import ApiServer
from tools.simulators.cloud_hypervisor.vmm import BUILD_VERSION, Vmm

UNPLUG_SECONDS_ENV = "CLOUD_HYPERVISOR_SIM_VCPU_UNPLUG_SECONDS"
# "1": behave as a binary built with the guest_debug feature (a default release build is not).
GUEST_DEBUG_ENV = "CLOUD_HYPERVISOR_SIM_GUEST_DEBUG"
DEFAULT_UNPLUG_SECONDS = 0.2


def _socket_path(value: str) -> Path:
    options = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
    if "fd" in options:
        raise SystemExit("cloud-hypervisor-sim: --api-socket fd=N is not supported; "
                         "use path=PATH")
    return Path(options.get("path", value))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloud-hypervisor-sim",
        description="Cloud Hypervisor v53.0 HTTP API simulator.")
    parser.add_argument("--api-socket", help="path=<path> (or just <path>)")
    parser.add_argument("--no-shutdown", action="store_true",
                        help="do not exit the VMM when the guest shuts down")
    parser.add_argument("-v", action="count", default=0,
                        help="log API requests (info) to the log file")
    parser.add_argument("--log-file", type=Path, help="where to log API requests")
    # As v53's command line: the value is checked, the filter itself is not simulated.
    parser.add_argument("--seccomp", choices=("true", "false", "log"), default="true",
                        help="seccomp filter: true, false or log (accepted, not simulated)")
    parser.add_argument("--landlock", action="store_true",
                        help="Landlock for a VM given on the command line (accepted, not "
                             "simulated)")
    parser.add_argument("--landlock-rules", nargs="+", action="append",
                        help="path=<path>,access=[rw]")
    if guest_debug_built():
        parser.add_argument("--gdb", help="GDB socket (UNIX domain socket): path=<path> "
                            "(accepted and ignored: the simulator has no GDB stub)")
    parser.add_argument("--event-monitor", help="path=<file>: where events are written")
    parser.add_argument("-V", "--version", action="store_true")
    return parser


def guest_debug_built() -> bool:
    """Whether to act as a build with the guest_debug feature: only those take --gdb."""
    return os.environ.get(GUEST_DEBUG_ENV, "") == "1"


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        # clap's refusal, as a release build gives it for --gdb.
        print(f"error: unexpected argument '{unknown[0]}' found\n\n"
              "Usage: cloud-hypervisor [OPTIONS]\n\nFor more information, try '--help'.",
              file=sys.stderr)
        return 2
    if args.version:
        print(f"cloud-hypervisor {BUILD_VERSION} (API simulator)")
        return 0
    if not args.api_socket:
        print("cloud-hypervisor-sim: --api-socket is required: the simulator only runs VMs "
              "defined through the API", file=sys.stderr)
        return 1
    socket_path = _socket_path(args.api_socket)
    events.set_monitor(args.event_monitor)
    if socket_path.exists():
        if _socket_in_use(socket_path):
            print(f"cloud-hypervisor-sim: API socket {socket_path} is in use by another "
                  "instance", file=sys.stderr)
            return 1
        socket_path.unlink()  # stale, left by a crash
    unplug_seconds = float(os.environ.get(UNPLUG_SECONDS_ENV, DEFAULT_UNPLUG_SECONDS))
    try:
        server = ApiServer(
            socket_path,
            lambda srv: Vmm(args.no_shutdown, unplug_seconds, srv.request_exit,
                            guest_debug_built()),
            args.log_file, args.v)
    except OSError as e:
        print(f"cloud-hypervisor-sim: cannot serve the API on {socket_path}: "
              f"{os_error_text(e)}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        server.request_exit()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True, name="http-server").start()
    while not server.exit_requested.wait(0.5):
        pass
    with server.vmm.lock:
        server.vmm.vm_delete()
    try:
        socket_path.unlink()
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    return 0
