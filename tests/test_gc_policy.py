"""The controller's garbage-collector policy: refreeze only on a large change of the fleet,
and a refreeze reclaims cyclic garbage that an earlier freeze had kept."""

from __future__ import annotations

import gc
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


def test_a_refreeze_reclaims_garbage_frozen_earlier() -> None:
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
        alive = weakref.ref(a)
        gc.freeze()
        del a, b
        gc.collect()
        assert alive() is not None, "frozen objects are not collected"
        gc_policy.refreeze()
        assert alive() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
