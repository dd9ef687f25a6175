"""Many simulated Firecracker instances in one process, for host-scale measurements.

Each instance is the simulator's own API server, VMM, logger and metrics behind its own
Unix socket, exactly as `firecracker-sim --api-sock PATH --id ID` serves one; they share
one event loop instead of one process each, so a thousand fit on a small machine.
FlushMetrics appends a line to each instance's metrics file as Firecracker does.

    python -m tools.simulators.firecracker.many --ready FILE SOCKET:ID ...
    python -m tools.simulators.firecracker.many --ready FILE --from FILE   (SOCKET:ID lines)

The ready file is written once every socket accepts connections. SIGTERM ends the process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from tools.simulators.firecracker.api import ApiHandler
from tools.simulators.firecracker.cli import DEFAULT_PAYLOAD_LIMIT
from tools.simulators.firecracker.http import ApiServer, EventLoop, bind_unix
from tools.simulators.firecracker.logger import Logger
from tools.simulators.firecracker.metrics import Metrics
from tools.simulators.firecracker.vmm import METRICS_PERIOD_S, Vmm


class Instance:
    """One simulated Firecracker process's API on a shared loop."""

    def __init__(self, loop: EventLoop, socket_path: str, instance_id: str) -> None:
        self.logger = Logger(instance_id)
        self.metrics = Metrics()
        self.vmm = Vmm(instance_id, self.logger, self.metrics, loop, self._exit,
                       DEFAULT_PAYLOAD_LIMIT, METRICS_PERIOD_S)
        handler = ApiHandler(self.vmm, self.logger, self.metrics, self._exit)
        self.server = ApiServer(loop, bind_unix(socket_path), handler, DEFAULT_PAYLOAD_LIMIT)
        self.exited: int | None = None

    def _exit(self, code: int) -> None:
        # One instance ending (e.g. a guest reboot) does not end the others.
        self.exited = code
        self.server.stop_listening()


def serve(pairs: list[tuple[str, str]], ready: Path | None = None) -> None:
    loop = EventLoop()
    instances = [Instance(loop, path, instance_id) for path, instance_id in pairs]
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    if ready is not None:
        ready.write_text(f"{os.getpid()} {len(instances)}\n")
    loop.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.simulators.firecracker.many")
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--from", dest="source", type=Path,
                        help="a file of SOCKET:ID lines")
    parser.add_argument("pairs", nargs="*", help="SOCKET:ID")
    args = parser.parse_args(argv)
    lines = list(args.pairs)
    if args.source is not None:
        lines += [line for line in args.source.read_text().splitlines() if line.strip()]
    pairs = [(path, instance_id) for path, _, instance_id in
             (line.rpartition(":") for line in lines)]
    serve(pairs, args.ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
