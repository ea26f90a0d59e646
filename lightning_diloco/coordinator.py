"""The coordinator of islands mode: torchft's lighthouse, which forms the quorum of the islands at every outer step.

Run it once, anywhere every island can reach (``lightning-diloco coordinator --port 29510``), and give its address
to every island (``DiLoCoStrategy(coordinator="http://HOST:29510")``). It holds no training state: the islands do,
and they heal from each other. Its policy:

- ``min_islands``: a quorum needs at least this many islands; an island waits for them (up to its
  ``quorum_timeout``).
- ``grace``: once the first island of an outer step asks for a quorum, the others have this long to join it; an
  island later than that does not hold the others. It joins the next outer step, where it is behind and heals from a
  peer: its late pseudo-gradient is dropped.
- ``heartbeat_timeout``: an island that stops sending heartbeats (dead, or stopped) this long is left out of quorums.
"""

import argparse
import signal
import threading
from typing import Any, Optional

from lightning_diloco.islands import require_torchft


def start_coordinator(
    port: int = 29510, min_islands: int = 1, grace: float = 5.0, heartbeat_timeout: float = 5.0, host: str = "[::]"
) -> Any:
    """Start a coordinator in this process and return it (``.address()`` is what islands connect to,
    ``.shutdown()`` stops it).

    Args:
        port: the port to listen on (0 takes a free one).
        min_islands: the smallest quorum.
        grace: seconds the islands of an outer step wait for the others once the first asked for a quorum.
        heartbeat_timeout: seconds without a heartbeat after which an island is left out.
        host: the interface to listen on (all by default).

    """
    if min_islands < 1:
        raise ValueError(f"`min_islands` must be at least 1, got {min_islands}.")
    if not grace > 0 or not heartbeat_timeout > 0:
        raise ValueError(
            f"`grace` and `heartbeat_timeout` must be positive seconds, got {grace} and {heartbeat_timeout}."
        )
    require_torchft()
    from torchft._torchft import LighthouseServer

    return LighthouseServer(
        bind=f"{host}:{port}", min_replicas=min_islands, join_timeout_ms=int(grace * 1000), quorum_tick_ms=50,
        heartbeat_timeout_ms=int(heartbeat_timeout * 1000),
    )


def main(args: Optional[list[str]] = None) -> None:
    """``lightning-diloco coordinator``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="lightning-diloco coordinator", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=29510, help="port to listen on (default 29510; 0: a free one)")
    parser.add_argument("--host", default="[::]", help="interface to listen on (default: all)")
    parser.add_argument("--min-islands", type=int, default=1, help="the smallest quorum (default 1)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds the islands of an outer step wait for late ones (default 5)")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0,
                        help="seconds without a heartbeat after which an island is dropped (default 5)")
    ns = parser.parse_args(args)
    try:
        server = start_coordinator(ns.port, ns.min_islands, ns.grace, ns.heartbeat_timeout, ns.host)
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"coordinator listening at {server.address()} (min_islands={ns.min_islands}, grace={ns.grace}s,"
          f" heartbeat_timeout={ns.heartbeat_timeout}s)", flush=True)
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
