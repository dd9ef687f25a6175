"""Preflight verdicts an agent gave a moment ago, so that a burst of creates of one config on
one host (a CI pool, a function's instances) asks the agent once, not once per VM.

Only a pass is kept, per agent session and backend, for the config exactly as sent (any
other path, size or NIC is another key), and only briefly: what preflight checks (the files
exist, a bridge is there) can change at any moment anyway, which is why the agent checks it
again at create, before anything starts. A pass that has gone stale costs what a file removed
right after preflight costs today: the create fails and is undone.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from vmm.v1 import vm_pb2

# How long a pass is taken as still true.
REUSE_SECONDS = 1.0
# Passes kept per session: the distinct configs a host is being sent at once.
MAX_KEPT = 256


class PassedPreflights:
    def __init__(self, reuse_seconds: float = REUSE_SECONDS, max_kept: int = MAX_KEPT) -> None:
        self.reuse_seconds = reuse_seconds
        self.max_kept = max_kept
        # (backend, config bytes) -> when the agent passed it (monotonic seconds).
        self._passed: OrderedDict[tuple[str, bytes], float] = OrderedDict()

    def passed(self, backend: str, config: vm_pb2.VmConfig) -> bool:
        """Whether the agent passed this very config for this backend a moment ago."""
        at = self._passed.get(_key(backend, config))
        return at is not None and time.monotonic() - at < self.reuse_seconds

    def note_passed(self, backend: str, config: vm_pb2.VmConfig) -> None:
        key = _key(backend, config)
        self._passed[key] = time.monotonic()
        self._passed.move_to_end(key)
        while len(self._passed) > self.max_kept:
            self._passed.popitem(last=False)


def _key(backend: str, config: vm_pb2.VmConfig) -> tuple[str, bytes]:
    return backend, config.SerializeToString(deterministic=True)
