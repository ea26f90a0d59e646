"""A slow network link between two network namespaces: TUN devices, a kernel rate limit, a userspace delay.

This kernel has no ``netem``, so the delay is made here: one TUN device in each namespace, and this process copies
every IP packet that leaves one TUN into the other after holding it ``--delay-ms`` (one way; the round trip is twice
that). The rate limit is the kernel's token bucket filter (``tc qdisc ... tbf``) on each TUN's egress, so the link
is ``--rate-mbit`` in each direction and packets wait (or drop) in the kernel's queue as on a real bottleneck.

Run as root from the repository root, as a child of :mod:`benchmarks.slow_link` (which creates and deletes the
namespaces)::

    python -m benchmarks.netlink_relay --ns dl0 dl1 --dev dl0tun dl1tun --addr 10.77.0.1 10.77.0.2 \\
        --delay-ms 20 --rate-mbit 100

It prints ``READY`` once both ends are up and relays until it gets SIGTERM/SIGINT or its stdin closes; the TUN
devices vanish with it. On exit it prints one JSON line of counters (packets, bytes, CPU seconds it used).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (IP packets, no extra header) in this namespace; return its non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class DelayRelay:
    """Moves datagrams between two file descriptors, each one ``delay`` seconds after it was read.

    Works on any pair of datagram-preserving descriptors (TUN devices, ``socketpair(AF_UNIX, SOCK_DGRAM)``). Order
    is kept per direction (a constant delay is a FIFO).
    """

    def __init__(self, fd_a: int, fd_b: int, delay: float, max_packet: int = 65536) -> None:
        self.fds = (fd_a, fd_b)
        self.delay = delay
        self.max_packet = max_packet
        self.queues: tuple[collections.deque, collections.deque] = (collections.deque(), collections.deque())
        self.packets = [0, 0]
        self.bytes = [0, 0]
        self.dropped = 0
        self.max_queued = [0, 0]
        self.stopped = False

    def _read_all(self, side: int, now: float) -> None:
        fd, queue = self.fds[side], self.queues[1 - side]  # what side reads goes out of the other side
        while True:
            try:
                packet = os.read(fd, self.max_packet)
            except BlockingIOError:
                return
            except OSError:  # the device went away
                self.stopped = True
                return
            if not packet:
                return
            queue.append((now + self.delay, packet))
            self.max_queued[1 - side] = max(self.max_queued[1 - side], len(queue))

    def _write_due(self, now: float) -> float | None:
        """Write every due packet; return the time of the next one, if any."""
        following = None
        for side in (0, 1):
            queue, fd = self.queues[side], self.fds[side]
            while queue and queue[0][0] <= now:
                _, packet = queue.popleft()
                try:
                    os.write(fd, packet)
                    self.packets[side] += 1
                    self.bytes[side] += len(packet)
                except BlockingIOError:
                    self.dropped += 1
                except OSError:
                    self.stopped = True
                    return None
            if queue and (following is None or queue[0][0] < following):
                following = queue[0][0]
        return following

    def run(self, until: float | None = None, stop_fd: int | None = None) -> None:
        """Relay until ``until`` (a ``time.monotonic()`` value), ``stop_fd`` is readable/closed, or :meth:`stop`."""
        watched = list(self.fds) + ([stop_fd] if stop_fd is not None else [])
        following = None
        while not self.stopped:
            now = time.monotonic()
            if until is not None and now >= until:
                return
            timeout = 0.5 if following is None else max(0.0, following - now)
            if until is not None:
                timeout = min(timeout, max(0.0, until - now))
            ready, _, _ = select.select(watched, [], [], timeout)
            now = time.monotonic()
            for fd in ready:
                if fd == stop_fd:
                    return
                self._read_all(self.fds.index(fd), now)
            following = self._write_due(now)

    def stop(self, *_: object) -> None:
        self.stopped = True

    def counters(self) -> dict[str, object]:
        usage = os.times()
        return {"packets": self.packets, "bytes": self.bytes, "dropped": self.dropped, "max_queued": self.max_queued,
                "cpu_seconds": usage.user + usage.system}


def sh(*commands: str) -> None:
    for command in commands:
        subprocess.run(command, shell=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns", nargs=2, required=True, help="the two network namespaces (they must exist)")
    parser.add_argument("--dev", nargs=2, required=True, help="names of the TUN devices to create")
    parser.add_argument("--addr", nargs=2, required=True, help="IPv4 address of each end")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay, each direction")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="rate of each direction (0: no limit)")
    parser.add_argument("--mtu", type=int, default=9000)
    args = parser.parse_args()

    fds = [open_tun(dev) for dev in args.dev]
    for i in (0, 1):
        ns, dev, me, peer = args.ns[i], args.dev[i], args.addr[i], args.addr[1 - i]
        sh(f"ip link set {dev} netns {ns}",
           f"ip -n {ns} link set lo up",
           f"ip -n {ns} link set {dev} mtu {args.mtu}",
           f"ip -n {ns} addr add {me}/32 peer {peer}/32 dev {dev}",
           f"ip -n {ns} link set {dev} up")
        if args.rate_mbit > 0:
            # bucket of 4 MTUs; queue of about 2 bandwidth-delay products (rate x round trip) before drops
            bdp = int(args.rate_mbit * 1e6 / 8 * 2 * args.delay_ms / 1e3)
            limit = max(2 * bdp, 16 * args.mtu)
            sh(f"ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {args.rate_mbit}mbit"
               f" burst {4 * args.mtu} limit {limit}")
    relay = DelayRelay(fds[0], fds[1], args.delay_ms / 1e3, max_packet=args.mtu + 64)
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    print("READY", flush=True)
    try:
        relay.run(stop_fd=sys.stdin.fileno())
    finally:
        print(json.dumps(relay.counters()), flush=True)


if __name__ == "__main__":
    main()
