"""How the controller and the agent have gRPC do its socket I/O.

Since grpcio 1.85, Python processes run gRPC's I/O on its EventEngine by default: each
message read or written crosses from an EventEngine thread to the thread that waits on the
completion queue before asyncio sees it. The poll-based I/O that Python used before polls
in that waiting thread itself. Measured here on a loopback unary call with 10 ms between
calls (grpc.aio server and channel in one process): 0.55-0.59 ms with the EventEngine,
0.31-0.33 ms with poll-based I/O. A VM's create and boot cross about twelve such hops
(API calls, the agent's stream, etcd).

gRPC reads the setting once, when it loads, so this runs before anything imports grpc.
GRPC_EXPERIMENTS set in the environment wins, which turns the EventEngine back on
("GRPC_EXPERIMENTS=event_engine_client,event_engine_listener").
"""

from __future__ import annotations

import logging
import os
import sys

# The EventEngine rollouts that grpcio 1.85 turned on for Python.
POLL_BASED_IO = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def prefer_poll_based_io() -> None:
    if "grpc" in sys.modules:
        logging.getLogger(__name__).warning(
            "grpc was loaded before its I/O could be chosen; it keeps its default")
        return
    os.environ.setdefault("GRPC_EXPERIMENTS", POLL_BASED_IO)
