"""Training samples: fixed-length token windows, the shard of each worker, and a loader that resumes mid-epoch.

:class:`PackedSequences` cuts a flat token file into windows of ``seq_len + 1`` tokens; :class:`ShardSampler` gives
every DiLoCo worker (or DDP process) its own iid or non-iid shard of them, the same on every run for a seed; and
:class:`ResumableDataLoader` records how far into the epoch it got, so that a run resumed from a mid-epoch checkpoint
continues with the next unseen batch.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class PackedSequences(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens over a flat token array.

    Args:
        tokens: One-dimensional token ids, or the path of a raw binary file of them (memory-mapped read-only; only
            the path is pickled when the dataset is sent to DataLoader worker processes).
        seq_len: Model input length; each item has ``seq_len + 1`` tokens.
        dtype: Element type of the file (ignored for arrays).
        count: Number of tokens in the file (ignored for arrays).
    """

    def __init__(
        self,
        tokens: Union[np.ndarray, str, Path],
        seq_len: int,
        dtype: Union[str, np.dtype] = "uint16",
        count: Optional[int] = None,
    ) -> None:
        if isinstance(tokens, (str, Path)):
            self.path: Optional[str] = str(tokens)
            self.dtype = np.dtype(dtype)
            self.count = int(count) if count is not None else os.path.getsize(tokens) // self.dtype.itemsize
            self._tokens: Optional[np.ndarray] = None
        else:
            self.path, self.dtype, self.count, self._tokens = None, tokens.dtype, len(tokens), tokens
        self.seq_len = seq_len
        self.window = seq_len + 1
        self.num_sequences = self.count // self.window

    @property
    def tokens(self) -> np.ndarray:
        """The flat token array (opened on first use)."""
        if self._tokens is None:
            assert self.path is not None
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_tokens"] = None  # reopen the memory map instead of copying the file
        return state

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> Tensor:
        if not -self.num_sequences <= index < self.num_sequences:
            raise IndexError(f"Sequence index {index} out of range for {self.num_sequences} sequences.")
        index %= self.num_sequences
        start = index * self.window
        return torch.from_numpy(np.asarray(self.tokens[start : start + self.window], dtype=np.int64))


class ShardSampler(DistributedSampler):
    """Training sampler that gives each of ``num_replicas`` workers its own, equally sized shard.

    Being a :class:`~torch.utils.data.distributed.DistributedSampler`, Lightning uses it as is and does not replace
    it. Every shard has ``len(dataset) // num_replicas`` samples (the remainder is left out), so all workers run the
    same number of steps per epoch.

    Args:
        dataset: The training dataset (only its length is used).
        num_replicas: Number of workers.
        rank: This worker's index.
        sharding: ``"iid"``: each epoch, a random permutation of all samples (seeded by ``seed`` and the epoch) is
            split into disjoint shards. ``"noniid"``: worker ``r`` always gets the ``r``-th contiguous block of
            samples; only the order within the block is shuffled each epoch.
        shuffle: Shuffle (within the shard for ``noniid``). ``False`` keeps the corpus order.
        seed: Seed of the shuffles; identical on all workers.
        num_parts: Split this worker's shard further into this many equal parts (the processes of an island, which
            shares the data with other islands as one of ``num_replicas``); 1 by default.
        part: The part this process takes.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        sharding: Literal["iid", "noniid"] = "iid",
        shuffle: bool = True,
        seed: int = 0,
        num_parts: int = 1,
        part: int = 0,
    ) -> None:
        if sharding not in ("iid", "noniid"):
            raise ValueError(f"`sharding` must be 'iid' or 'noniid', got {sharding!r}.")
        if not 0 <= part < num_parts:
            raise ValueError(f"`part` must be in [0, num_parts) = [0, {num_parts}), got {part}.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.sharding = sharding
        self.num_parts, self.part = num_parts, part
        self.dataset_size = len(dataset)  # type: ignore[arg-type]
        self.shard_size = self.dataset_size // num_replicas
        self.num_samples = self.shard_size // num_parts
        self.total_size = self.num_samples * num_replicas
        self._resume_epoch: Optional[int] = None
        self._resume_offset = 0
        self.iter_epoch, self.iter_offset = 0, 0

    def shard_indices(self, epoch: Optional[int] = None) -> list[int]:
        """This worker's sample indices for an epoch (the current one by default), in iteration order."""
        epoch = self.epoch if epoch is None else epoch
        start = self.rank * self.shard_size + self.part * self.num_samples
        if self.sharding == "iid":
            order = np.arange(self.dataset_size)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
            shard = order[start : start + self.num_samples]
        else:
            shard = np.arange(start, start + self.num_samples)
            if self.shuffle:
                key = self.rank * self.num_parts + self.part
                shard = shard[np.random.default_rng([self.seed, epoch, key]).permutation(self.num_samples)]
        return shard.tolist()

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` samples the next time the sampler iterates epoch ``epoch``."""
        self._resume_epoch = epoch
        self._resume_offset = max(0, consumed)

    def __iter__(self) -> Iterator[int]:
        indices = self.shard_indices()
        offset = 0
        if self._resume_epoch is not None:
            if self._resume_epoch == self.epoch:
                offset = min(self._resume_offset, len(indices))
            self._resume_epoch, self._resume_offset = None, 0
        #: epoch and number of skipped samples of the latest iteration, read by ResumableDataLoader.state_dict
        self.iter_epoch, self.iter_offset = self.epoch, offset
        return iter(indices[offset:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` that remembers how far into the epoch it got.

    ``state_dict()`` returns the epoch and the number of samples handed out so far; after ``load_state_dict()`` the
    next iteration of that epoch skips them. Lightning saves the state of such loaders in checkpoints
    (``loops.fit_loop.state_dict.combined_loader``) and restores it before iterating again. Requires a
    :class:`ShardSampler` and a fixed ``batch_size``.
    """

    _batches_yielded = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._shard_sampler()
        self._batches_yielded = 0
        return self._counting(super().__iter__())

    def _counting(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches_yielded += 1
            yield batch

    def _shard_sampler(self) -> ShardSampler:
        if not isinstance(self.sampler, ShardSampler):
            raise TypeError(f"{type(self).__name__} needs a ShardSampler, got {type(self.sampler).__name__}.")
        return self.sampler

    def state_dict(self) -> dict[str, int]:
        """Epoch and number of samples of that epoch already handed out."""
        sampler = self._shard_sampler()
        consumed = sampler.iter_offset + self._batches_yielded * (self.batch_size or 1)
        return {"epoch": sampler.iter_epoch, "consumed_samples": consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue the saved epoch after the samples it had already handed out."""
        sampler = self._shard_sampler()
        epoch = int(state_dict["epoch"])
        # set the epoch now: worker processes may draw indices before Lightning calls `set_epoch` again
        sampler.set_epoch(epoch)
        sampler.resume(epoch, int(state_dict["consumed_samples"]))
