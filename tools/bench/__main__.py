"""`make bench`: measure the control plane and print the numbers; save them as JSON.

Each benchmark starts what it measures from scratch (real etcd, the controller and an
agent as separate processes) on loopback. Results go to var/bench/<name>.json.

    python -m tools.bench [--only NAME ...] [--quick] [--fleet-sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tools.bench.agent import bench_agent
from tools.bench.firecracker import bench_firecracker
from tools.bench.fleet import DEFAULT_SIZES, bench_fleet
from tools.bench.qemu import bench_qemu
from tools.bench.recovery import bench_recovery
from tools.bench.scheduler import bench_scheduler

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "var" / "bench"

BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "firecracker": bench_firecracker,
    "qemu": bench_qemu,
    "scheduler": bench_scheduler,
    "fleet": bench_fleet,
    "agent": bench_agent,
    "recovery": bench_recovery,
}


def fleet_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("fleet sizes must be positive")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench",
                                     description="Run the benchmarks.")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke check")
    parser.add_argument("--fleet-sizes", type=fleet_sizes, default=None,
                        help="hollow hosts per fleet run, comma-separated (default "
                        f"{','.join(map(str, DEFAULT_SIZES))}; with --quick 100,1000)")
    args = parser.parse_args()
    runners: dict[str, Callable[[bool], dict[str, Any]]] = {
        **BENCHMARKS, "fleet": partial(bench_fleet, sizes=args.fleet_sizes)}
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        result = runners[name](args.quick)
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = json.dumps(result, indent=2)
        print(text)
        (OUT / f"{name}.json").write_text(text + "\n")
        print(f"saved {OUT / f'{name}.json'}")


if __name__ == "__main__":
    main()
