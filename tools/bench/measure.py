"""What the benchmarks report with: latency summaries of timing samples, a process's RSS."""

from __future__ import annotations

import statistics

import psutil


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 2),
            "p99_ms": round(percentile(ms, 0.99), 2), "mean_ms": round(statistics.mean(ms), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}


def rss_mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / (1 << 20), 1)
