"""The cyclic garbage collector, tuned for a process that keeps a fleet in memory.

At 10,000 hosts the controller tracks about 1.5 million long-lived objects: sessions and
their streams, host views, caches. Each full collection walks all of them. At 10,000
hollow hosts under create load, 21 full collections in 10 s paused the controller for
0.4-1 s each, and those pauses set the tail latency of every call.

Nearly all of these objects live as long as their host's session does, so they are frozen
(`gc.freeze`): collections walk only what was made since. Two steps keep it so:

- A *full refreeze* thaws everything, collects it and freezes what survives. It runs when
  the fleet has grown or shrunk by a tenth, or when the process has grown by a quarter
  since the last one; it reclaims frozen objects that became cyclic garbage, so that
  garbage stays a bounded fraction. (Memory is the measure because counting the frozen
  objects, `gc.get_freeze_count()`, walks all of them: 0.3 s at 10,000 hosts.)
- An *incremental freeze* collects only the unfrozen objects and freezes the survivors. It
  runs when those have piled up (heartbeats replace host state, creates add VM records):
  without it, they are walked by every full collection again, and after the first one
  CPython's own trigger (a quarter of the last survivors) fires every few seconds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
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
# Freeze the unfrozen long-lived objects once there are this many (a full collection of
# them takes about 1 µs each).
UNFROZEN_LIMIT = 20_000


def should_refreeze(size: int, frozen_at: int) -> bool:
    return abs(size - frozen_at) >= max(MIN_CHANGE, CHANGE_FRACTION * frozen_at)


def refreeze() -> float:
    """Thaw, collect everything and freeze what survives; the seconds it took."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


def freeze_survivors() -> float:
    """Collect what is not frozen and freeze what survives; the seconds it took."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


def unfrozen_long_lived() -> int:
    """Objects in the oldest generation that are not frozen: what a full collection walks."""
    return len(gc.get_objects(generation=2))


def resident_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


@dataclass
class FreezePolicy:
    """What the last full refreeze saw; decides which step, if any, is due."""

    fleet_size: int = 0
    memory: int = 0

    def step(self, fleet_size: int) -> None:
        memory = resident_bytes()
        if should_refreeze(fleet_size, self.fleet_size) \
                or memory > (1 + MEMORY_GROWTH) * self.memory:
            took = refreeze()
            self.memory = resident_bytes()
            log.info("garbage collector: everything refrozen for a fleet of %d (was %d), "
                     "%d MiB resident, in %.0f ms", fleet_size, self.fleet_size,
                     self.memory >> 20, took * 1000)
            self.fleet_size = fleet_size
        elif (unfrozen := unfrozen_long_lived()) >= UNFROZEN_LIMIT:
            took = freeze_survivors()
            log.debug("garbage collector: at most %d more objects frozen, in %.0f ms",
                      unfrozen, took * 1000)


async def keep_frozen(fleet_size: Callable[[], int], interval: float = 10.0) -> None:
    """Every interval, take whichever step of the policy is due for fleet_size()."""
    policy = FreezePolicy()
    while True:
        await asyncio.sleep(interval)
        policy.step(fleet_size())
