"""The outer step on its own: its time, its temporary memory, and the memory-bandwidth bound it is held against.

One worker (a world of one: the mean of one pseudo-gradient is itself, so no collective runs) drives the strategy's
round loop (:class:`~lightning_diloco.rounds.Rounds`) with ``inner_steps=1``: every call of ``after_inner_step`` is one
whole outer step, as the strategy takes it: the pseudo-gradient ``global - local``, the finiteness census, the mean,
the outer Nesterov step and the copy of the new global weights into the model.

The bound is the traffic a fused outer step cannot avoid, over the copy bandwidth measured on the same device in the
same run: read the local weights, the global weights and the momentum, write the momentum, the global weights and
the local weights, 4 bytes each (fp32) per parameter: 24 bytes per parameter. With the global state on the CPU of a
CUDA model (``outer_device="cpu"``), the local weights also cross the host link twice (8 bytes per parameter, at the
pinned-copy bandwidth), which is that mode's bound.

Temporary memory is the peak of memory in use during the step above what was in use before it: the CUDA allocator's
own peak on a GPU; on the CPU the process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``
before the step), exact when the process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large temporary then gets
fresh pages; :data:`MEASURING_ENV`).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_diloco.census import Census
from lightning_diloco.config import DiLoCoConfig
from lightning_diloco.gpt import GPT, GPTConfig
from lightning_diloco.outer import OuterState
from lightning_diloco.rounds import Rounds
from lightning_diloco.topology import Topology
from lightning_diloco.workers import ProcessGroupWorkers

#: The environment a process measuring CPU temporaries needs from its start (glibc reads it once).
MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
#: Bytes per parameter a fused fp32 outer step must move in device memory (see the module's docstring).
BOUND_BYTES_PER_PARAM = 24
#: Bytes per parameter crossing the host link when the global state lives on the CPU of a CUDA model.
HOST_LINK_BYTES_PER_PARAM = 8
#: Sizes of the models the outer step is timed on: the GPT presets, and a 1B configuration.
CONFIGS: dict[str, dict[str, int]] = {
    "1b": {"n_layer": 18, "n_embd": 2048, "n_head": 16, "vocab_size": 32000, "block_size": 1024},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_gpt(size: str, device: torch.device) -> nn.Module:
    """A GPT of preset ``size`` (or a configuration of :data:`CONFIGS`), created on ``device``."""
    config = GPTConfig(**CONFIGS[size]) if size in CONFIGS else GPTConfig.from_preset(size)
    with torch.device(device):
        return GPT(config)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 7) -> float:
    """Bytes per second moved (read + written) by ``dst.copy_(src)`` on ``device``, median of ``repeats``."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * nbytes / statistics.median(times[1:])


def host_link_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second of a pinned host-to-device plus device-to-host round trip, median of ``repeats``."""
    host = torch.ones(nbytes // 4, pin_memory=True)
    on_device = torch.empty(nbytes // 4, device=device)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        on_device.copy_(host, non_blocking=True)
        host.copy_(on_device, non_blocking=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * nbytes / statistics.median(times[1:])


class _PeakMemory:
    """The peak of memory in use above the level at :meth:`start`, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.base = _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_bytes("VmHWM") - self.base


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert match is not None, key
    return int(match.group(1)) * 1024


@dataclass
class OuterStepTiming:
    """What :func:`time_outer_step` measured."""

    parameters: int
    seconds: list[float]
    temporary_bytes: int
    state_bytes: int
    kept_bytes: int  # buffers the sync keeps from one outer step to the next (the bucket it writes into)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def one_worker_rounds(module: nn.Module, outer_device: torch.device, communication_device: torch.device,
                      **options: Any) -> Rounds:
    """The round loop of a world of one worker over ``module``, taking an outer step after every inner step."""
    config = DiLoCoConfig(inner_steps=1, **options)
    outer = OuterState(module, config.build_outer_optimizer(), outer_device)
    workers = ProcessGroupWorkers(Topology(0, 1, 1, None, None, "gloo"))  # one process: no process group
    census = Census(1, False, "skip", print)
    return Rounds(config, module, outer, workers, census, communication_device, None, lambda landed: None,
                  lambda: None, print, print)


@torch.no_grad()
def time_outer_step(
    module: nn.Module, outer_device: Optional[torch.device] = None, communication_device: Optional[torch.device] = None,
    repeats: int = 5, **options: Any,
) -> OuterStepTiming:
    """Time ``repeats`` outer steps of one worker over ``module`` (after one untimed step), with the temporary memory
    of the last one.

    Args:
        module: the model, on the device it trains on.
        outer_device: where the global weights and momentum live (the model's device by default).
        communication_device: where the pseudo-gradients are built (the model's device by default, as for NCCL).
        repeats: timed outer steps.
        **options: other :class:`~lightning_diloco.config.DiLoCoConfig` options.

    """
    device = next(module.parameters()).device
    outer_device = outer_device or device
    rounds = one_worker_rounds(module, outer_device, communication_device or device, **options)
    params = list(module.parameters())
    seconds = []
    memory = _PeakMemory(outer_device if device.type == "cpu" else device)
    for i in range(repeats + 1):
        for p in params:  # an inner step's worth of change, so that every step has a pseudo-gradient to apply
            p.add_(1e-3)
        if i == repeats:
            memory.start()
        synchronize(device)
        started = time.perf_counter()
        rounds.after_inner_step()
        synchronize(device)
        if i:
            seconds.append(time.perf_counter() - started)
    temporary = memory.peak()
    outer = rounds.outer
    state = [*outer.params, *(t for s in outer.optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
    kept = [rounds._buffer, *outer._staged.values()]
    return OuterStepTiming(sum(p.numel() for p in params), seconds, temporary,
                           sum(t.numel() * t.element_size() for t in state),
                           sum(t.numel() * t.element_size() for t in kept if t is not None))
