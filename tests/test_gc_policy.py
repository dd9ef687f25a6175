"""The controller's garbage-collector policy: refreeze only on a large change of the fleet,
and a refreeze reclaims cyclic garbage that an earlier freeze had kept."""

from __future__ import annotations

import gc
import time
import weakref

from controller import gc_policy


def test_only_a_large_change_of_the_fleet_refreezes() -> None:
    assert gc_policy.should_refreeze(10_000, 0)
    assert gc_policy.should_refreeze(100, 0)
    assert not gc_policy.should_refreeze(99, 0)  # a small fleet is cheap to collect anyway
    assert not gc_policy.should_refreeze(10_500, 10_000)
    assert gc_policy.should_refreeze(11_000, 10_000)
    assert gc_policy.should_refreeze(9_000, 10_000)  # hosts leaving count too


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """Cyclic garbage, which only the cyclic collector frees; a reference that tells."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def frozen_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.freeze()
    return weakref.ref(a)


def test_a_refreeze_reclaims_garbage_frozen_earlier() -> None:
    try:
        alive = frozen_cycle()
        gc.collect()
        assert alive() is not None, "frozen objects are not collected"
        gc_policy.refreeze()
        assert alive() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_each_step_freezes_what_survived_since_the_last() -> None:
    try:
        policy = gc_policy.FreezePolicy(fleet_size=0, memory=1 << 50)  # no full refreeze due
        kept = [Node() for _ in range(20_000)]
        garbage = cycle()
        frozen_before = gc.get_freeze_count()
        policy.step(0)
        assert garbage() is None, "young cyclic garbage is collected, not frozen"
        assert gc.get_freeze_count() >= frozen_before + len(kept)
        assert not gc.get_objects(generation=2), "nothing left for a full collection"
    finally:
        gc.unfreeze()


def test_growth_of_the_process_brings_a_full_refreeze() -> None:
    try:
        policy = gc_policy.FreezePolicy(fleet_size=0, memory=gc_policy.resident_bytes())
        alive = frozen_cycle()
        policy.step(0)
        assert alive() is not None, "no refreeze while the process has not grown"
        kept = bytearray(int(gc_policy.MEMORY_GROWTH * policy.memory) + (8 << 20))
        kept[::4096] = b"x" * len(kept[::4096])  # resident, not just reserved
        policy.step(0)
        assert alive() is None, "a full refreeze collects what was frozen"
        assert policy.memory >= len(kept)
    finally:
        gc.unfreeze()


def test_full_refreezes_are_spaced_out() -> None:
    try:
        # Due by memory, but one ran a moment ago.
        policy = gc_policy.FreezePolicy(fleet_size=0, memory=0, at=time.monotonic())
        alive = frozen_cycle()
        policy.step(0)
        assert alive() is not None
        policy.at -= gc_policy.REFREEZE_SPACING
        policy.step(0)
        assert alive() is None
    finally:
        gc.unfreeze()
