"""Train the toy model under torchrun, kill a worker where ``FAULT`` says, and resume from the last checkpoint.

Run with ``python -m torch.distributed.run --nproc-per-node 2 --max-restarts N recovery_train.py --out DIR ...``.
``FAULT=kill:rank=R:step=S:where=W`` SIGKILLs rank R in the first attempt only (``TORCHELASTIC_RESTART_COUNT=0``):

- ``mid_round``: right after optimizer step S (between two outer steps).
- ``in_sync``: inside the outer step at step S, with its first all-reduce in flight (the other ranks are in it too).
- ``in_checkpoint_write``: while the checkpoint of step S is saved. On rank 0 (the writer) halfway through the bytes
  of the ``meta.pt`` of the checkpoint directory named ``file=NAME`` (default ``last.ckpt``); on another rank inside
  the strategy's ``save_checkpoint``, while rank 0 waits for it.

Every attempt resumes with ``ckpt_path="last"``. Each rank writes ``rank<R>.pt`` (final weights, the checkpoint it
resumed from) and appends a line per attempt to ``attempts.txt``.
"""

import argparse
import io
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any, Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
torch_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from lightning_diloco.clean_exit import close_process_groups  # noqa: E402
from helpers.toy import ToyModule, loaders  # noqa: E402
from lightning_diloco import DiLoCoStrategy  # noqa: E402
from lightning_diloco.checkpoint_io import AtomicCheckpointIO  # noqa: E402

WHERE = ("mid_round", "in_sync", "in_checkpoint_write")


@dataclass
class Fault:
    rank: int
    step: int
    where: str
    file: str = "last.ckpt"


def parse_fault(spec: str) -> Optional[Fault]:
    """``kill:rank=1:step=7:where=mid_round[:file=NAME]`` as a :class:`Fault`; empty means none."""
    if not spec:
        return None
    kind, *fields = spec.split(":")
    if kind != "kill":
        raise ValueError(f"FAULT must start with 'kill:', got {spec!r}")
    values = dict(field.split("=", 1) for field in fields)
    fault = Fault(int(values["rank"]), int(values["step"]), values["where"], values.get("file", "last.ckpt"))
    if fault.where not in WHERE:
        raise ValueError(f"FAULT where= must be one of {WHERE}, got {fault.where!r}")
    return fault


def die(reason: str) -> None:
    print(f"[rank {os.environ.get('RANK')}] SIGKILL {reason}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterBytes(io.RawIOBase):
    """A file wrapper that SIGKILLs the process once ``limit`` bytes have reached the file on disk."""

    def __init__(self, file: IO[bytes], limit: int) -> None:
        super().__init__()
        self.file, self.limit, self.written = file, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        room = self.limit - self.written
        if len(data) >= room:
            self.file.write(data[:room])
            self.file.flush()
            os.fsync(self.file.fileno())
            die(f"after writing {self.limit} bytes of a checkpoint")
        self.written += self.file.write(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()


class FaultyCheckpointIO(AtomicCheckpointIO):
    """Kills the writer halfway through the file the fault names."""

    def __init__(self, fault: Optional[Fault]) -> None:
        super().__init__()
        self.fault = fault
        self.step = -1
        self._limit: Optional[int] = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        f = self.fault
        self._limit = None
        if f and f.where == "in_checkpoint_write" and f.rank == 0 and self.step == f.step and (path.endswith(f.file) or f"/.{f.file}." in path):
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            self._limit = buffer.getbuffer().nbytes // 2
        super().save_checkpoint(checkpoint, path, storage_options)

    def _wrap_file(self, file: IO[bytes]) -> IO[bytes]:
        return file if self._limit is None else KillAfterBytes(file, self._limit)  # type: ignore[return-value]


class FaultyStrategy(DiLoCoStrategy):
    """DiLoCo with the fault of ``FAULT`` injected into the outer step or the checkpoint."""

    def __init__(self, fault: Optional[Fault], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fault = fault

    @property
    def step(self) -> int:
        """Optimizer steps taken (there is no warm-up here)."""
        assert self.lightning_module is not None
        return self.lightning_module.trainer.global_step

    def _armed(self, where: str, step: int) -> bool:
        f = self.fault
        return f is not None and f.where == where and f.rank == self.global_rank and step == f.step

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        step = self.step + 1  # the step this call takes, after which its outer step runs
        if not self._armed("in_sync", step):
            return super().optimizer_step(*args, **kwargs)
        real_all_reduce = dist.all_reduce

        def all_reduce_then_die(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            kwargs["async_op"] = True
            real_all_reduce(tensor, *args, **kwargs)  # in flight on gloo's thread: the other ranks are inside it
            die(f"inside the outer step at step {step}")

        dist.all_reduce = all_reduce_then_die  # type: ignore[assignment]
        try:
            super().optimizer_step(*args, **kwargs)
        finally:
            dist.all_reduce = real_all_reduce
        die(f"at the end of the outer step at step {step} (it made no all_reduce call)")

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if self._armed("in_checkpoint_write", self.step) and self.global_rank != 0:
            die(f"in save_checkpoint at step {self.step} while rank 0 waits for its state")
        if isinstance(self.checkpoint_io, FaultyCheckpointIO):
            self.checkpoint_io.step = self.step
        super().save_checkpoint(checkpoint, filepath, storage_options)


class KillMidRound(Callback):
    def __init__(self, fault: Optional[Fault]) -> None:
        self.fault = fault

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        f = self.fault
        if f and f.where == "mid_round" and f.rank == trainer.global_rank and trainer.global_step == f.step:
            die(f"after step {f.step}")


class RecordStart(Callback):
    def __init__(self, out: str, attempt: int) -> None:
        self.out, self.attempt = out, attempt
        self.start_step: Optional[int] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        with open(os.path.join(self.out, "attempts.txt"), "a") as f:
            f.write(f"rank={trainer.global_rank} attempt={self.attempt} start_step={self.start_step}"
                    f" resumed_from={trainer.ckpt_path}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="process group timeout, in seconds")
    parser.add_argument("--save-last", default="true", choices=["true", "link"])
    args = parser.parse_args()
    torch.set_num_threads(torch_threads)

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    fault = parse_fault(os.environ.get("FAULT", "")) if attempt == 0 else None
    strategy = FaultyStrategy(
        fault,
        inner_steps=args.inner_steps,
        timeout=timedelta(seconds=args.timeout),
        checkpoint_io=FaultyCheckpointIO(fault),
    )
    os.makedirs(args.out, exist_ok=True)
    start = RecordStart(args.out, attempt)
    checkpoint = ModelCheckpoint(
        dirpath=os.path.join(args.out, "ckpt"),
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        save_top_k=-1,
        save_last=True if args.save_last == "true" else "link",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "2")),
        strategy=strategy,
        max_epochs=args.max_epochs,
        callbacks=[checkpoint, KillMidRound(fault), start],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = ToyModule()
    train, val = loaders()
    trainer.fit(model, train, val, ckpt_path="last")

    record = {
        "final": {k: v.clone() for k, v in model.state_dict().items()},
        "attempt": attempt,
        "start_step": start.start_step,
        "resumed_from": trainer.ckpt_path,
        "global_step": trainer.global_step,
    }
    torch.save(record, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
    close_process_groups()  # with main's Trainer gone: no gloo thread outlives the interpreter
