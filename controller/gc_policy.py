"""The cyclic garbage collector, tuned for a process that keeps a fleet in memory.

At 10,000 hosts the controller tracks about 1.5 million long-lived objects: sessions and
their streams, host views, caches. Each full collection walks all of them. At 10,000
hollow hosts under create load, 21 full collections in 10 s paused the controller for
0.4-1 s each, and those pauses set the tail latency of every call.

Nearly all of these objects live as long as their host's session does, so they are frozen
(`gc.freeze`): collections walk only what was made since. Two steps keep it so:

- Every second, a young collection, then a freeze of what survived it. Heartbeats replace
  host state (about 15,000 objects a second at 10,000 hosts) and creates add VM records;
  left unfrozen, all of it is walked again by every full collection, which CPython starts
  every few seconds once the last one found few survivors (150-200 ms each at 10,000 hosts).
  Frozen, a full collection walks at most a second's worth of objects.
- A *full refreeze* thaws everything, collects it and freezes what survives. It runs when
  the fleet has grown or shrunk by a tenth, or when the process has grown by a quarter since
  the last one, and at most once a minute (it takes 1.5 s at 10,000 hosts); it reclaims
  frozen objects that became cyclic garbage (those that die of their last reference are
  freed even while frozen), so that garbage stays a bounded fraction. Memory is the measure
  because counting the frozen objects (`gc.get_freeze_count()`) walks all of them: 0.3 s at
  10,000 hosts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

# Fully refreeze when the fleet has changed by this fraction of its size at the last one...
CHANGE_FRACTION = 0.1
# ... and by at least this many members (a small fleet is cheap to collect anyway);
MIN_CHANGE = 100
# ... or when the process's resident memory has grown by this fraction since.
MEMORY_GROWTH = 0.25
# At most one full refreeze in this many seconds.
REFREEZE_SPACING = 60.0


def should_refreeze(size: int, frozen_at: int) -> bool:
    return abs(size - frozen_at) >= max(MIN_CHANGE, CHANGE_FRACTION * frozen_at)


def refreeze() -> float:
    """Thaw, collect everything and freeze what survives; the seconds it took."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


def freeze_survivors() -> None:
    """Collect the young generations and freeze what survives, with whatever is in the
    oldest generation already."""
    gc.collect(1)
    gc.freeze()


_SELF = psutil.Process()


def resident_bytes() -> int:
    return int(_SELF.memory_info().rss)


@dataclass
class FreezePolicy:
    """What the last full refreeze saw; decides which step, if any, is due."""

    fleet_size: int = 0
    memory: int = 0
    at: float = -math.inf

    def step(self, fleet_size: int) -> None:
        now = time.monotonic()
        if now - self.at >= REFREEZE_SPACING and (
                should_refreeze(fleet_size, self.fleet_size)
                or resident_bytes() > (1 + MEMORY_GROWTH) * self.memory):
            took = refreeze()
            self.at = now
            self.memory = resident_bytes()
            log.info("garbage collector: everything refrozen for a fleet of %d (was %d), "
                     "%d MiB resident, in %.0f ms", fleet_size, self.fleet_size,
                     self.memory >> 20, took * 1000)
            self.fleet_size = fleet_size
        else:
            freeze_survivors()


async def keep_frozen(fleet_size: Callable[[], int], interval: float = 1.0) -> None:
    """Every interval, take whichever step of the policy is due for fleet_size()."""
    policy = FreezePolicy()
    while True:
        await asyncio.sleep(interval)
        policy.step(fleet_size())
