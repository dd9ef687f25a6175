"""`make bench`: measure the control plane and print the numbers; save them as JSON.

Each benchmark starts what it measures from scratch (real etcd, the controller and an
agent as separate processes) on loopback. Results go to var/bench/<name>.json.

    python -m tools.bench [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.bench.firecracker import bench_firecracker
from tools.bench.qemu import bench_qemu

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "var" / "bench"

BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "firecracker": bench_firecracker,
    "qemu": bench_qemu,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench",
                                     description="Run the benchmarks.")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke check")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        result = BENCHMARKS[name](args.quick)
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = json.dumps(result, indent=2)
        print(text)
        (OUT / f"{name}.json").write_text(text + "\n")
        print(f"saved {OUT / f'{name}.json'}")


if __name__ == "__main__":
    main()
