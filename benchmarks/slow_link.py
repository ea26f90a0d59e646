"""Two workers joined by a slow link (100 Mbit/s, 20 ms each way): tokens/s and compute utilisation.

Needs root, ``ip netns``, ``tc`` (tbf) and ``/dev/net/tun``. Builds two network namespaces, joins them through
:mod:`benchmarks.netlink_relay` (a TUN device in each namespace; tbf rate limit on each TUN's egress; the relay
process holds every packet ``--delay-ms`` before passing it on, so the round trip is ``2 * delay``), checks the link,
then runs rank 0 in one namespace and rank 1 in the other as two nodes (``num_nodes=2``) of one gloo process group,
with ``GLOO_SOCKET_IFNAME`` set to the namespace's TUN and ``MASTER_ADDR`` the address of rank 0's end. Everything
it created is removed on exit (also on Ctrl-C).

This machine's two cores are shared with other jobs, whose load swings the wall-clock speed of a step by 3x from
minute to minute, so times are taken as on cores of the workers' own (see :func:`dedicated`): the time the training
thread was runnable but waiting for a CPU (Linux schedstat) is removed, the CPU time of the process's other threads is
added, and blocked time (network, peer) is kept. Compute utilisation is the run's throughput over the throughput of
the same run's steps with no communication: the share of that time the training thread spent computing training
steps, everything the syncs cost (CPU in outer steps, other threads' extra CPU, waiting) counted against it. Beside it,
the ratio of tokens/s to those of separate runs of the same two processes with no communication at all (DiLoCo with H
larger than the run; this ratio also holds the run-to-run spread of a shared machine), and the raw wall-clock numbers. The configurations and their
repeats are interleaved in one launch; measured over whole rounds (from the end of the first round to the end of the
run); medians over repeats.

    python -m benchmarks.slow_link                         # about 13 minutes on 2 CPU cores (25 when busy)
    python -m benchmarks.slow_link --repeats 1 --inner-steps 12 --ddp-steps 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ._common import ROOT, human_bytes, median, run_plan, table, window

#: This module and the relay's, as ``python -m`` runs them (from ``ROOT``) inside the namespaces.
MODULE, RELAY = f"{__package__}.slow_link", f"{__package__}.netlink_relay"
SUBNET = "10.77.0"  # addresses exist only inside the namespaces this script creates


# ------------------------------------------------------------------------------------------------------------------
# The link
# ------------------------------------------------------------------------------------------------------------------


def _sh(command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, check=check, capture_output=True, text=True)


@contextmanager
def slow_link(delay_ms: float, rate_mbit: float, mtu: int) -> Iterator[dict[str, Any]]:
    """Two namespaces joined by the relayed, shaped link; yields their names, devices and addresses."""
    for need in ("ip", "tc"):
        if shutil.which(need) is None:
            raise SystemExit(f"`{need}` is not installed; slow_link.py needs iproute2 (ip, tc).")
    if os.geteuid() != 0:
        raise SystemExit("slow_link.py creates network namespaces: run it as root.")
    if not os.path.exists("/dev/net/tun"):
        raise SystemExit("/dev/net/tun is missing: the delay relay needs TUN devices (modprobe tun).")
    tag = f"dl{os.getpid() % 100000}"
    link = {"ns": [f"{tag}a", f"{tag}b"], "dev": [f"{tag}ta", f"{tag}tb"], "addr": [f"{SUBNET}.1", f"{SUBNET}.2"]}
    relay = None
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on SIGTERM too
    try:
        for ns in link["ns"]:
            _sh(f"ip netns add {ns}")
        relay = subprocess.Popen(
            [sys.executable, "-m", RELAY, "--ns", *link["ns"], "--dev", *link["dev"], "--addr",
             *link["addr"], "--delay-ms", str(delay_ms), "--rate-mbit", str(rate_mbit), "--mtu", str(mtu)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        line = relay.stdout.readline() if relay.stdout else ""
        if line.strip() != "READY":
            raise RuntimeError(f"the relay did not start (printed {line!r}, exit code {relay.poll()})")
        try:  # the relay gets a better share of the CPU than the trainers, so that it adds no delay of its own
            os.setpriority(os.PRIO_PROCESS, relay.pid, -10)
        except OSError:
            pass
        link["relay"] = relay
        yield link
    finally:
        if relay is not None:
            try:  # closing its stdin stops the relay; it prints its counters
                out, _ = relay.communicate(timeout=10)
                counters = out.strip().splitlines()[-1:] if out else []
                if counters:
                    link["relay_counters"] = json.loads(counters[0])
            except (subprocess.TimeoutExpired, ValueError):
                relay.kill()
        for ns in link["ns"]:
            _sh(f"ip netns pids {ns} | xargs -r kill -9", check=False)
            _sh(f"ip netns del {ns}", check=False)
        signal.signal(signal.SIGTERM, previous)


def _in_ns(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def check_link(link: dict[str, Any], megabytes: int = 12) -> dict[str, float]:
    """Round trip (median of 10 small TCP exchanges) and bulk rate (``megabytes`` one way) over the link."""
    port = 29400
    server = subprocess.Popen([*_in_ns(link["ns"][1]), sys.executable, "-m", MODULE, "--_sink", link["addr"][1],
                               str(port)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "listening"
        probe = subprocess.run([*_in_ns(link["ns"][0]), sys.executable, "-m", MODULE, "--_probe", link["addr"][1],
                                str(port), str(megabytes)], capture_output=True, text=True, timeout=120, check=True,
                               cwd=ROOT)
        return json.loads(probe.stdout.strip().splitlines()[-1])
    finally:
        server.kill()
        server.wait()


def _sink(addr: str, port: int) -> None:
    """Echo 1-byte pings; swallow bulk data and answer with one byte when it ends."""
    with socket.create_server((addr, port)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    return
                if data == b"p":
                    conn.sendall(b"p")
                elif data.endswith(b"E"):
                    conn.sendall(b"d")


def _probe(addr: str, port: int, megabytes: int) -> None:
    with socket.create_connection((addr, port), timeout=60) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(10):
            start = time.perf_counter()
            conn.sendall(b"p")
            conn.recv(1)
            rtts.append(time.perf_counter() - start)
            time.sleep(0.01)
        payload = b"x" * (1 << 20)
        start = time.perf_counter()
        for _ in range(megabytes):
            conn.sendall(payload)
        conn.sendall(b"E")
        conn.recv(1)
        seconds = time.perf_counter() - start
    print(json.dumps({"rtt_ms": 1e3 * statistics.median(rtts), "rate_mbit": megabytes * 8 * 2**20 / seconds / 1e6}))


# ------------------------------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    h = args.inner_steps
    diloco_steps = h * (args.rounds + 1)
    configs = [
        ("no communication", {"strategy": "diloco", "inner_steps": 10**6, "max_steps": diloco_steps}),
        ("DDP", {"strategy": "ddp", "max_steps": args.ddp_steps}),
        (f"DiLoCo H={h}", {"inner_steps": h}),
        (f"DiLoCo H={h} int8", {"inner_steps": h, "compression": "int8"}),
        (f"DiLoCo H={h} e3m0", {"inner_steps": h, "compression": "e3m0"}),
        (f"streaming F={args.fragments} tau={args.tau} fp32",
         {"inner_steps": h, "fragments": args.fragments, "overlap": args.tau}),
        (f"streaming F={args.fragments} tau={args.tau_4bit} e3m0",
         {"inner_steps": h, "fragments": args.fragments, "overlap": args.tau_4bit, "compression": "e3m0"}),
        (f"DiLoCo H={h} eager d=1", {"inner_steps": h, "eager": 1}),
        (f"DiLoCo H={h} eager d=2", {"inner_steps": h, "eager": 2}),
        (f"DiLoCo H={h} e3m0 eager d=1", {"inner_steps": h, "compression": "e3m0", "eager": 1}),
    ]
    model = {"preset": "tiny", "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head}
    out = []
    for label, config in configs:
        out.append({"label": label, "strategy": "diloco", "max_steps": diloco_steps, "batch_size": args.batch_size,
                    "seq_len": args.seq_len, "model": model, **config})
    return out


def measured_window(run: dict[str, Any]) -> tuple[int, int]:
    """Whole rounds: from the end of the first round (H steps) to the end of the run; DDP after 5 warm-up steps."""
    if run["strategy"] == "ddp":
        return min(5, run["max_steps"] - 1), run["max_steps"]
    h = min(run["inner_steps"], run["max_steps"] // 2)
    return h, run["max_steps"]


def dedicated(windows: list[dict[str, Any]], base_other_cpu: float = 0.0) -> dict[str, float]:
    """Per step: CPU time and waiting time of the two workers, as on cores of their own, and the utilisation.

    The wall-clock time of a step on this shared machine also holds the time the training thread was runnable but
    waited for a CPU taken by other jobs (Linux schedstat ``run_delay``); that is removed. What is left is the
    training thread's CPU time, the CPU time of the process's other threads (gloo, the sync thread; counted as if
    they ran on the same core, which is conservative), and the time the training thread was blocked (waiting for
    the network or for the other worker). Of the blocked time, the worker that waited less is taken: the other one
    also waited for a peer that other jobs had slowed down.

    utilisation = compute / (compute + overhead): compute is the training thread's CPU time outside outer steps;
    overhead is its CPU time inside them (pseudo-gradients, outer update), the other threads' CPU time beyond that of
    the run without communication (``base_other_cpu`` per step), and the blocked time.
    """
    steps = windows[0]["steps"]
    cpu = statistics.mean(w["thread_cpu"] for w in windows) / steps
    outer_cpu = statistics.mean(w["outer_cpu"] for w in windows) / steps
    other = statistics.mean(max(0.0, w["process_cpu"] - w["thread_cpu"]) for w in windows) / steps
    blocked = min(max(0.0, w["seconds"] - w["thread_cpu"] - w["run_delay"]) for w in windows) / steps
    compute = cpu - outer_cpu
    overhead = outer_cpu + max(0.0, other - base_other_cpu) + blocked
    return {"cpu": cpu, "outer_cpu": outer_cpu, "other_cpu": other, "blocked": blocked, "step": cpu + other + blocked,
            "utilisation": compute / (compute + overhead)}


def summarize(results: dict[str, list[dict[str, Any]]], configs: list[dict[str, Any]], repeats: int
              ) -> list[dict[str, Any]]:
    rows = []
    for config in configs:
        per_repeat = []
        for r in range(repeats):
            ranks = results[f"{config['key']}-r{r}"]
            windows = [window(rank, *measured_window(config)) for rank in ranks]
            base_windows = [window(rank, *measured_window(configs[0])) for rank in results[f"{configs[0]['key']}-r{r}"]]
            wall_tokens = sum(w["tokens_per_second"] for w in windows)
            base_wall_tokens = sum(w["tokens_per_second"] for w in base_windows)
            base = dedicated(base_windows)
            mine = dedicated(windows, base["other_cpu"])
            outer = windows[0]["outer"]
            per_repeat.append({
                "tokens_per_second": len(ranks) * ranks[0]["tokens_per_step"] / mine["step"],
                "utilisation": mine["utilisation"],
                "throughput_ratio": base["step"] / mine["step"],
                "outer_cpu_ms": 1e3 * mine["outer_cpu"],
                "wall_tokens_per_second": wall_tokens, "wall_utilisation": wall_tokens / base_wall_tokens,
                "cpu_ms": 1e3 * mine["cpu"], "other_cpu_ms": 1e3 * mine["other_cpu"],
                "blocked_ms": 1e3 * mine["blocked"],
                "run_delay_share": statistics.mean(w["run_delay"] / w["seconds"] for w in windows),
                "exposed": max(w["outer_seconds"] / w["seconds"] for w in windows),
                "exchange_ms": 1e3 * max(w["exchange_seconds"] for w in windows) / max(1, len(outer)),
                "collectives_per_step": max(w["main_collectives_per_step"] for w in windows),
                "sync_seconds": median([o["diloco/sync_seconds"] for o in outer]) if outer else None,
                "comm_seconds": median([o["diloco/comm_seconds"] for o in outer]) if outer else None,
                "blocked_seconds": median([o["diloco/blocked_seconds"] for o in outer]) if outer else None,
                "bytes_per_sync": max(o["diloco/bytes_sent"] for o in outer) if outer else None,
                "syncs": len(outer),
                "ddp_bytes_per_step": ranks[0]["ddp_bucket_bytes"] / ranks[0]["global_step"],
                "loadavg": ranks[0]["loadavg"][0],
            })
        row: dict[str, Any] = {"label": config["label"], "strategy": config["strategy"], "repeats": per_repeat}
        for key in per_repeat[0]:
            values = [p[key] for p in per_repeat if p[key] is not None]
            row[key] = median(values) if values else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (round trip: twice this)")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--mtu", type=int, default=9000)
    parser.add_argument("--inner-steps", type=int, default=50, help="H")
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds of H steps (after a first one)")
    parser.add_argument("--ddp-steps", type=int, default=20)
    parser.add_argument("--fragments", type=int, default=4)
    parser.add_argument("--tau", type=int, default=5, help="overlap steps of the fp32 streaming run")
    parser.add_argument("--tau-4bit", type=int, default=2, help="overlap steps of the e3m0 streaming run")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--only", nargs="*", type=int, help="indices of the configurations to run (0 always runs)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_sink", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._sink:
        return _sink(args._sink[0], int(args._sink[1]))
    if args._probe:
        return _probe(args._probe[0], int(args._probe[1]), int(args._probe[2]))

    configs = configurations(args)
    for i, config in enumerate(configs):
        config["key"] = f"c{i}"
    if args.only is not None:
        configs = [c for i, c in enumerate(configs) if i == 0 or i in args.only]
    runs = [{**{k: v for k, v in c.items() if k not in ("label", "key")}, "name": f"{c['key']}-r{r}"}
            for r in range(args.repeats) for c in configs]
    started = time.perf_counter()
    with slow_link(args.delay_ms, args.rate_mbit, args.mtu) as link:
        probe = check_link(link)
        print(f"link: {args.rate_mbit:g} Mbit/s and {args.delay_ms:g} ms each way (tbf + TUN relay, MTU {args.mtu});"
              f" measured round trip {probe['rtt_ms']:.1f} ms, bulk TCP {probe['rate_mbit']:.1f} Mbit/s", flush=True)
        out = Path(tempfile.mkdtemp(prefix="diloco-slow-link-"))
        prefixes = [_in_ns(ns) for ns in link["ns"]]
        env = [{"GLOO_SOCKET_IFNAME": dev, "TP_SOCKET_IFNAME": dev} for dev in link["dev"]]
        results = run_plan(runs, 2, out=out, prefixes=prefixes, master_addr=link["addr"][0], per_node=True,
                           extra_env=env, timeout=4 * 3600)
    rows = summarize(results, configs, args.repeats)
    loads = [p["loadavg"] for row in rows for p in row["repeats"]]
    delays = [p["run_delay_share"] for row in rows for p in row["repeats"]]
    first = results[f"{configs[0]['key']}-r0"][0]
    params = first["num_parameters"]
    print(f"\nmodel: GPT {args.n_layer} layers x {args.n_embd} hidden, {params:,} parameters"
          f" ({human_bytes(4 * params)} fp32); {args.batch_size} x {args.seq_len} tokens per step and worker;"
          f" 2 workers, 1 CPU thread each; medians of {args.repeats} interleaved repeats; 1-minute load average"
          f" of the machine {min(loads):.1f} to {max(loads):.1f}; the training threads waited for a CPU"
          f" {100 * min(delays):.0f}% to {100 * max(delays):.0f}% of the time")
    if "relay_counters" in link:
        c = link["relay_counters"]
        print(f"relay: {sum(c['packets'])} packets, {human_bytes(sum(c['bytes']))}, {c['dropped']} dropped by the"
              f" relay, {c['cpu_seconds']:.1f} CPU s over {time.perf_counter() - started:.0f} s")
    table_rows = []
    for row in rows:
        is_diloco = row["strategy"] == "diloco" and row["label"] != "no communication"
        sent = row["bytes_per_sync"] if is_diloco else (row["ddp_bytes_per_step"] if row["label"] == "DDP" else None)
        table_rows.append([
            row["label"], "-" if sent is None else human_bytes(sent) + (" /step" if row["label"] == "DDP" else ""),
            f"{row['tokens_per_second']:.0f}", f"**{100 * row['utilisation']:.1f}%**",
            " ".join(f"{100 * p['utilisation']:.1f}" for p in row["repeats"]),
            f"{100 * row['throughput_ratio']:.1f}%",
            f"{row['blocked_ms']:.1f}", f"{row['cpu_ms']:.0f} ({row['outer_cpu_ms']:.1f}) + {row['other_cpu_ms']:.0f}",
            "-" if row["sync_seconds"] is None else f"{row['sync_seconds']:.2f}",
            f"{row['exchange_ms']:.0f}" if is_diloco else "-",
            f"{row['collectives_per_step']:.2f}",
            f"{row['wall_tokens_per_second']:.0f} ({100 * row['wall_utilisation']:.0f}%)",
        ])
    print()
    print(table(["configuration", "sent per sync", "tokens/s", "compute utilisation", "per repeat (%)",
                 "tokens/s vs no-communication runs", "waiting ms/step", "CPU ms/step: training thread (in outer steps)"
                 " + other threads", "sync s", "health all-gather ms/sync", "training-thread collectives/step",
                 "wall-clock tokens/s (vs no comm.)"], table_rows))
    print(
        "\ntokens/s: both workers, as on cores of their own: wall-clock time minus the time the training thread"
        " waited for a CPU taken by other jobs (schedstat), plus the CPU time of the process's other threads, with"
        " the blocked time of the worker that waited less. compute utilisation: the run's tokens/s over the tokens/s"
        " of the same run's steps with no communication, i.e. the share of its time spent computing training steps ="
        " compute / (compute + CPU in outer steps + extra CPU of other threads + waiting), all from the same run"
        " (median over repeats). tokens/s vs no-communication runs: the ratio to separate runs without communication"
        " in the same repeat (it also holds the run-to-run spread of a step's CPU time on a shared machine). waiting:"
        " time per step"
        " the training thread was blocked on the network or the peer. sync s: start of a sync to its outer update"
        " (median). health all-gather: the training thread's wait in the small all-gather that starts each sync"
        " (worker that waited most: it includes waiting for a peer slowed by other jobs). collectives: Python-level"
        " torch.distributed calls of the training thread per step (DDP's gradient all-reduce comes from its C++"
        " reducer and is not counted). wall-clock: as measured on this shared machine, unadjusted."
    )
    if args.json:
        args.json.write_text(json.dumps({"link": probe, "rows": rows, "args": vars(args)}, indent=1, default=str))
    print(f"\n({time.perf_counter() - started:.0f} s; results in {out})")


if __name__ == "__main__":
    main()
