"""Language-modelling data: documents, a byte-level BPE tokenizer, and packed fixed-length token sequences.

Pipeline of :class:`LMDataModule`:

1. **Documents** come from one of

   * the offline default corpus: the ``.py`` sources (and ``.txt``/``.rst`` files) of the running Python's standard
     library, one document per file, in sorted path order. It exists on every machine with Python and needs no
     download;
   * local files (``data_files``: JSON lines, text, parquet, CSV), read with :func:`datasets.load_dataset`;
   * any dataset of the Hugging Face hub by name and config, e.g. ``allenai/c4``/``en``, streamed.

   Reading stops after ``max_documents`` documents or ``max_chars`` characters. Bytes that are not valid UTF-8 are
   replaced by U+FFFD instead of failing.
2. **Held-out splits** are chosen by document: every ``1 / val_fraction``-th document (evenly spread over the corpus)
   goes to validation and likewise for ``test_fraction``; the rest is training data. The splits never share a
   document.
3. **Tokenizer**: a given ``tokenizer.json`` or a byte-level BPE trained once on the training documents.
4. **Tokens** of each split are written once as a flat binary file (documents separated by the end-of-text token)
   into ``cache_dir/<corpus>-<hash>/``, where the hash covers the source, the caps, the split fractions and the
   tokenizer. A second run with the same settings starts immediately.
5. **Sequences**: the flat token file is cut into non-overlapping windows of ``seq_len + 1`` tokens (a model input of
   ``seq_len`` tokens plus its shifted target); a batch is a ``LongTensor`` of shape ``[batch_size, seq_len + 1]``.

Sharding across DiLoCo workers (or DDP processes) happens in the training sampler, :class:`ShardSampler`:

* ``sharding="iid"``: every epoch the training sequences are shuffled with ``seed`` and split into disjoint, equally
  sized shards, one per worker.
* ``sharding="noniid"`` (the paper's non-i.i.d. setting): worker ``r`` of ``W`` always trains on the ``r``-th
  contiguous block of the corpus, in corpus order. For the standard-library corpus each worker thus gets its own group
  of packages (``asyncio`` vs. ``email`` ...); for local files, the order of the files decides, so list the files of a
  corpus grouped by domain to give every worker its own domain. Only the order inside a block is shuffled per epoch.
  Blocks are counted per process: when a DiLoCo worker spans several consecutive ranks
  (``DiLoCoStrategy(processes_per_worker=G)``), its ranks hold adjacent blocks, which together are again one
  contiguous block of the corpus.

Both modes are deterministic for a given ``seed`` and give every process the same number of batches.
:class:`ShardSampler` is a :class:`~torch.utils.data.distributed.DistributedSampler`, so Lightning keeps it and does
not insert its own: this works with ``Trainer(use_distributed_sampler=True)`` (the default) and ``False`` alike. The
rank and world size are read from the Trainer (``trainer.distributed_sampler_kwargs``). Validation and test loaders
are plain loaders that Lightning shards with its own ``DistributedSampler``.

The training loader (:class:`ResumableDataLoader`) has ``state_dict``/``load_state_dict``; Lightning stores it in
checkpoints and restores it, so resuming from a mid-epoch checkpoint continues with the next unseen batch of the same
epoch instead of restarting the epoch.
"""

import glob
import hashlib
import json
import os
import socket
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

#: Name of the offline default corpus (the Python standard library's own sources).
STDLIB = "stdlib"
#: Environment variable that overrides the default cache directory.
CACHE_ENV = "LIGHTNING_DILOCO_CACHE"
#: Bumped whenever the layout of the cached files changes.
_CACHE_FORMAT = 1
_STDLIB_SUFFIXES = (".py", ".txt", ".rst")
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
_BUILDER_BY_SUFFIX = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".parquet": "parquet",
    ".csv": "csv",
}
# Keyword arguments of `datasets.load_dataset` for local-file builders: decode invalid UTF-8 with replacement
# characters instead of failing, and read a text file as one document (not one document per line).
_DEFAULT_LOAD_KWARGS: dict[str, dict[str, Any]] = {
    # the json builder only applies `encoding_errors` when the encoding is not exactly "utf-8"
    "json": {"encoding": "utf-8-sig", "encoding_errors": "replace"},
    "text": {"sample_by": "document", "encoding_errors": "replace"},
    "csv": {"encoding_errors": "replace"},
}
_SPLITS = ("train", "val", "test")
# documents tokenized per call of the (multi-threaded) tokenizer
_ENCODE_CHUNK_DOCS = 256


def default_cache_dir() -> Path:
    """``$LIGHTNING_DILOCO_CACHE`` if set, else ``~/.cache/lightning_diloco``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lightning_diloco")).expanduser()


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))


def stdlib_files(root: Optional[Union[str, Path]] = None) -> list[Path]:
    """Files of the offline default corpus, sorted by relative path.

    Args:
        root: Directory to scan; the standard library of the running interpreter by default. Third-party packages
            (``site-packages``) and caches are skipped.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"The standard-library directory {str(root)!r} does not exist. Pass another corpus with"
            " `data_files=...` or `dataset=...`."
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(_STDLIB_SUFFIXES))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_text(path: Union[str, Path]) -> str:
    """Read a file as UTF-8, replacing undecodable bytes with U+FFFD."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def _expand_data_files(data_files: Union[str, list[str]]) -> list[str]:
    """Resolve local paths and glob patterns to a sorted, de-duplicated list of files."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    if not patterns:
        raise ValueError("`data_files` is empty. Pass at least one file or glob pattern.")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"No file matches {pattern!r}. Check the pattern given in `data_files`.")
            files.extend(m for m in matches if os.path.isfile(m))
        elif os.path.isdir(pattern):
            raise ValueError(
                f"{pattern!r} is a directory. Pass the files inside it, e.g. `data_files={pattern}/*.jsonl`."
            )
        elif not os.path.isfile(pattern):
            raise FileNotFoundError(f"Data file {pattern!r} does not exist. Check the path given in `data_files`.")
        else:
            files.append(pattern)
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


def infer_builder(path: str) -> str:
    """The :func:`datasets.load_dataset` builder (``json``, ``text``, ``parquet``, ``csv``) for a file name.

    Raises:
        ValueError: If the suffix is not recognised.
    """
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    builder = _BUILDER_BY_SUFFIX.get(suffixes[-1]) if suffixes else None
    if builder is None:
        raise ValueError(
            f"Cannot tell the format of {path!r} from its suffix. Set `dataset` to the `datasets` builder to use"
            f" (one of json, text, parquet, csv)."
        )
    return builder


class DocumentSource:
    """Where documents come from, and a deterministic iterator over them.

    Args:
        dataset: ``"stdlib"`` (or ``None`` without ``data_files``) for the offline standard-library corpus; a
            :func:`datasets.load_dataset` builder (``json``, ``text``, ``parquet``, ``csv``) for local files; or a
            dataset name on the Hugging Face hub such as ``allenai/c4``. ``None`` with ``data_files`` infers the
            builder from the file suffix.
        dataset_config: Configuration name of a hub dataset (``en`` for C4).
        data_files: Local file(s) or glob pattern(s).
        split: Split of the ``datasets`` dataset to read.
        text_column: Column holding the document text.
        streaming: Read with ``datasets`` streaming (documents are fetched lazily, nothing is materialised).
        load_kwargs: Extra keyword arguments of :func:`datasets.load_dataset`; they replace the defaults
            (``encoding_errors="replace"`` and, for text files, ``sample_by="document"``).
        max_documents: Stop after this many non-empty documents.
        max_chars: Stop once this many characters have been read (the last document is kept whole).
        hf_cache_dir: ``cache_dir`` handed to :func:`datasets.load_dataset`.
    """

    def __init__(
        self,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        data_files: Optional[Union[str, list[str]]] = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = True,
        load_kwargs: Optional[dict[str, Any]] = None,
        max_documents: Optional[int] = None,
        max_chars: Optional[int] = None,
        hf_cache_dir: Optional[Union[str, Path]] = None,
    ) -> None:
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"`max_documents` must be positive or None, got {max_documents}.")
        if max_chars is not None and max_chars < 1:
            raise ValueError(f"`max_chars` must be positive or None, got {max_chars}.")
        if dataset == STDLIB and data_files is not None:
            raise ValueError(
                f"`dataset={STDLIB!r}` reads the standard library; remove `data_files` or change `dataset`."
            )
        self.files: Optional[list[str]] = _expand_data_files(data_files) if data_files is not None else None
        if dataset is None:
            dataset = infer_builder(self.files[0]) if self.files else STDLIB
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.split = split
        self.text_column = text_column
        self.streaming = streaming
        self.load_kwargs = {**_DEFAULT_LOAD_KWARGS.get(dataset, {}), **(load_kwargs or {})}
        self.max_documents = max_documents
        self.max_chars = max_chars
        self.hf_cache_dir = str(hf_cache_dir) if hf_cache_dir is not None else None

    @property
    def name(self) -> str:
        """Short, file-system safe name of the source."""
        name = self.dataset if self.dataset_config is None else f"{self.dataset}-{self.dataset_config}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines which documents are produced, for cache keys."""
        info: dict[str, Any] = {
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "split": self.split,
            "text_column": self.text_column,
            "load_kwargs": {k: v for k, v in sorted(self.load_kwargs.items()) if k != "cache_dir"},
            "max_documents": self.max_documents,
            "max_chars": self.max_chars,
        }
        if self.dataset == STDLIB:
            root = stdlib_root()
            info["python"] = sys.version
            info["files"] = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in stdlib_files(root)]
        elif self.files is not None:
            info["files"] = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]
        return info

    def __iter__(self) -> Iterator[str]:
        """Yield non-empty documents in a fixed order until a cap is reached."""
        count = chars = 0
        for text in self._raw_documents():
            if not text or text.isspace():
                continue
            yield text
            count += 1
            chars += len(text)
            if (self.max_documents is not None and count >= self.max_documents) or (
                self.max_chars is not None and chars >= self.max_chars
            ):
                return

    def _raw_documents(self) -> Iterator[str]:
        if self.dataset == STDLIB:
            for path in stdlib_files():
                yield read_text(path)
            return
        yield from self._load_dataset_documents()

    def _load_dataset_documents(self) -> Iterator[str]:
        import datasets  # imported here: it is slow to import and only needed when the cache is built

        kwargs = dict(self.load_kwargs)
        kwargs.setdefault("cache_dir", self.hf_cache_dir)
        try:
            ds = datasets.load_dataset(
                self.dataset,
                self.dataset_config,
                split=self.split,
                data_files=self.files,
                streaming=self.streaming,
                **kwargs,
            )
        except UnicodeDecodeError as err:
            raise ValueError(self._encoding_help(err)) from err
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_column not in columns:
            raise ValueError(
                f"The dataset {self.dataset!r} has no column {self.text_column!r} (columns: {columns}). Set"
                " `text_column` to the column that holds the text."
            )
        iterator = iter(ds)
        while True:
            try:
                example = next(iterator)
            except StopIteration:
                return
            except UnicodeDecodeError as err:
                raise ValueError(self._encoding_help(err)) from err
            if self.text_column not in example:
                raise ValueError(
                    f"The dataset {self.dataset!r} has no column {self.text_column!r} (columns: {sorted(example)})."
                    " Set `text_column` to the column that holds the text."
                )
            text = example[self.text_column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"Column {self.text_column!r} of {self.dataset!r} holds {type(text).__name__}, not text. Set"
                    " `text_column` to a string column."
                )
            yield text

    def _encoding_help(self, err: UnicodeDecodeError) -> str:
        return (
            f"Could not decode {self.dataset!r} as UTF-8 ({err}). Pass the right encoding, e.g."
            " `load_kwargs={'encoding': 'latin-1'}`, or `load_kwargs={'encoding_errors': 'replace'}` to replace"
            " undecodable bytes."
        )


def assign_splits(documents: Iterable[str], val_fraction: float, test_fraction: float) -> Iterator[tuple[str, str]]:
    """Tag each document ``train``, ``val`` or ``test``; held-out documents are spread evenly over the corpus.

    Document ``i`` goes to validation when ``0.5 + (i + 1) * val_fraction`` crosses an integer, so any
    ``ceil(1 / val_fraction)`` consecutive documents contain one validation document. The same rule picks test
    documents among the remaining ones. The assignment depends only on the document order, not on the seed.

    Args:
        documents: The documents in corpus order.
        val_fraction: Fraction of documents held out for validation.
        test_fraction: Fraction of documents held out for testing.
    """
    val_acc = test_acc = 0.5
    for doc in documents:
        val_acc += val_fraction
        if val_acc >= 1.0:
            val_acc -= 1.0
            yield "val", doc
            continue
        test_acc += test_fraction
        if test_acc >= 1.0:
            test_acc -= 1.0
            yield "test", doc
            continue
        yield "train", doc


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, eos_token: str = "<|endoftext|>") -> Tokenizer:
    """Train a byte-level BPE tokenizer (any byte sequence round-trips through encode and decode).

    Args:
        texts: Training documents.
        vocab_size: Target vocabulary size, including the 256 byte tokens and ``eos_token``. A small corpus can
            yield fewer tokens.
        eos_token: Special token placed between documents.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        sharding: Literal["iid", "noniid"] = "iid",
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if sharding not in ("iid", "noniid"):
            raise ValueError(f"`sharding` must be 'iid' or 'noniid', got {sharding!r}.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.sharding = sharding
        self.dataset_size = len(dataset)  # type: ignore[arg-type]
        self.num_samples = self.dataset_size // num_replicas
        self.total_size = self.num_samples * num_replicas
        self._resume_epoch: Optional[int] = None
        self._resume_offset = 0
        self.iter_epoch, self.iter_offset = 0, 0

    def shard_indices(self, epoch: Optional[int] = None) -> list[int]:
        """This worker's sample indices for an epoch (the current one by default), in iteration order."""
        epoch = self.epoch if epoch is None else epoch
        if self.sharding == "iid":
            order = np.arange(self.dataset_size)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
            shard = order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]
        else:
            shard = np.arange(self.rank * self.num_samples, (self.rank + 1) * self.num_samples)
            if self.shuffle:
                shard = shard[np.random.default_rng([self.seed, epoch, self.rank]).permutation(self.num_samples)]
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


class LMDataModule(LightningDataModule):
    """Tokenized, packed language-modelling data for GPT training (see the module docstring for the pipeline).

    Args:
        dataset: ``"stdlib"`` for the offline standard-library corpus (the default when ``data_files`` is not
            given); a ``datasets`` builder (``json``, ``text``, ``parquet``, ``csv``) for ``data_files``; or a hub
            dataset name such as ``allenai/c4``. ``None`` infers the builder from the suffix of ``data_files``.
        dataset_config: Configuration of a hub dataset, e.g. ``en`` for C4.
        data_files: Local file(s) or glob pattern(s).
        split: Split of the ``datasets`` dataset to read documents from.
        text_column: Column with the document text.
        streaming: Let ``datasets`` stream the source (needed for C4: only the first documents are read).
        load_kwargs: Extra arguments of :func:`datasets.load_dataset` (e.g. ``{"revision": ...}``).
        max_documents: Read at most this many documents.
        max_chars: Read documents until this many characters have been collected.
        val_fraction: Fraction of documents held out for validation.
        test_fraction: Fraction of documents held out for testing. With ``0`` the test loader reuses the validation
            documents.
        tokenizer_path: A ``tokenizer.json`` (Hugging Face ``tokenizers`` format) to use instead of training one.
        vocab_size: Size of the trained BPE vocabulary; with ``tokenizer_path``, an upper bound the tokenizer must
            fit in (the model's embedding size).
        eos_token: End-of-text token put after every document. Must exist in a given tokenizer.
        tokenizer_train_chars: Train the BPE on at most this many characters of training text (``None``: all).
        seq_len: Tokens per model input; every sample holds ``seq_len + 1`` tokens.
        batch_size: Sequences per batch and worker.
        sharding: ``"iid"`` or ``"noniid"``, see :class:`ShardSampler`.
        seed: Seed of the training shuffle and of the iid sharding.
        cache_dir: Where tokenizers and token files are cached; ``$LIGHTNING_DILOCO_CACHE`` or
            ``~/.cache/lightning_diloco`` by default.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        data_files: Optional[Union[str, list[str]]] = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = True,
        load_kwargs: Optional[dict[str, Any]] = None,
        max_documents: Optional[int] = None,
        max_chars: Optional[int] = 5_000_000,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        tokenizer_path: Optional[str] = None,
        vocab_size: int = 2048,
        eos_token: str = "<|endoftext|>",
        tokenizer_train_chars: Optional[int] = None,
        seq_len: int = 128,
        batch_size: int = 16,
        sharding: Literal["iid", "noniid"] = "iid",
        seed: int = 0,
        cache_dir: Optional[str] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`test_fraction` must be in [0, 1) and `val_fraction + test_fraction` below 1, got {test_fraction}."
            )
        if seq_len < 1:
            raise ValueError(f"`seq_len` must be positive, got {seq_len}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        if sharding not in ("iid", "noniid"):
            raise ValueError(f"`sharding` must be 'iid' or 'noniid', got {sharding!r}.")
        if tokenizer_path is None and vocab_size < 257:
            raise ValueError(
                f"`vocab_size` must be at least 257 (256 byte tokens and the end-of-text token), got {vocab_size}."
            )
        if tokenizer_path is not None and not os.path.isfile(os.path.expanduser(tokenizer_path)):
            raise FileNotFoundError(f"Tokenizer file {tokenizer_path!r} does not exist. Check `tokenizer_path`.")
        self.cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.source = DocumentSource(
            dataset=dataset,
            dataset_config=dataset_config,
            data_files=data_files,
            split=split,
            text_column=text_column,
            streaming=streaming,
            load_kwargs=load_kwargs,
            max_documents=max_documents,
            max_chars=max_chars,
            hf_cache_dir=self.cache_root / "hf",
        )
        self.tokenizer: Optional[Tokenizer] = None
        self.eos_id: Optional[int] = None
        self.train_dataset: Optional[PackedSequences] = None
        self.val_dataset: Optional[PackedSequences] = None
        self.test_dataset: Optional[PackedSequences] = None
        #: ``True`` if the last :meth:`prepare_data` found everything cached, ``False`` if it built the cache.
        self.cache_hit: Optional[bool] = None
        self._cache_dir: Optional[Path] = None

    # ------------------------------------------------------------------ cache
    @property
    def cache_path(self) -> Path:
        """Directory holding this corpus' tokenizer and token files."""
        if self._cache_dir is None:
            key = json.dumps(self._fingerprint(), sort_keys=True, default=str)
            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            self._cache_dir = self.cache_root / f"{self.source.name}-{digest}"
        return self._cache_dir

    def _fingerprint(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.tokenizer_path is not None:
            tokenizer = {"file_sha256": _sha256_file(os.path.expanduser(hp.tokenizer_path))}
        else:
            tokenizer = {"bpe_vocab_size": hp.vocab_size, "train_chars": hp.tokenizer_train_chars}
        return {
            "format": _CACHE_FORMAT,
            "source": self.source.fingerprint(),
            "val_fraction": hp.val_fraction,
            "test_fraction": hp.test_fraction,
            "eos_token": hp.eos_token,
            "tokenizer": tokenizer,
        }

    def prepare_data(self) -> None:
        """Build the tokenizer and token files unless they are cached (Lightning calls this on one process per node).

        Raises:
            FileNotFoundError: If a data file does not exist.
            ValueError: If the corpus is empty or has too few documents for the held-out splits.
        """
        meta_path = self.cache_path / "meta.json"
        if meta_path.is_file():
            self.cache_hit = True
            return
        self.cache_hit = False
        self.cache_path.mkdir(parents=True, exist_ok=True)
        rank_zero_info(f"Building the token cache in {self.cache_path} ...")
        tokenizer = self._build_tokenizer()
        eos_id = self._eos_id(tokenizer)
        dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
        stats = self._write_tokens(tokenizer, eos_id, dtype)
        meta = {
            "format": _CACHE_FORMAT,
            "dtype": np.dtype(dtype).name,
            "eos_id": eos_id,
            "vocab_size": tokenizer.get_vocab_size(),
            "splits": stats,
            "fingerprint": self._fingerprint(),
        }
        _atomic_write_text(meta_path, json.dumps(meta, indent=1, default=str))
        rank_zero_info(f"Token cache ready: {describe_splits(stats)}")

    def _build_tokenizer(self) -> Tokenizer:
        hp = self.hparams
        if hp.tokenizer_path is not None:
            return Tokenizer.from_file(os.path.expanduser(hp.tokenizer_path))
        path = self.cache_path / "tokenizer.json"
        if path.is_file():
            return Tokenizer.from_file(str(path))
        tokenizer = train_bpe_tokenizer(self._tokenizer_training_texts(), hp.vocab_size, hp.eos_token)
        tmp = path.with_name(f"{path.name}.{_unique_suffix()}.tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, path)
        return tokenizer

    def _tokenizer_training_texts(self) -> Iterator[str]:
        budget = self.hparams.tokenizer_train_chars
        seen = 0
        splits = assign_splits(self.source, self.hparams.val_fraction, self.hparams.test_fraction)
        for split, doc in splits:
            if split != "train":
                continue
            if budget is not None and seen >= budget:
                return
            yield doc
            seen += len(doc)
        if seen == 0:
            raise self._empty_corpus_error()

    def _empty_corpus_error(self) -> ValueError:
        where = self.source.files if self.source.files is not None else self.source.dataset
        return ValueError(
            f"The corpus {where!r} has no training documents (all files empty, or too few documents for"
            f" val_fraction={self.hparams.val_fraction}). Point `data_files`/`dataset` at a non-empty corpus or"
            " raise `max_documents`/`max_chars`."
        )

    def _eos_id(self, tokenizer: Tokenizer) -> int:
        eos_id = tokenizer.token_to_id(self.hparams.eos_token)
        if eos_id is None:
            raise ValueError(
                f"The tokenizer has no token {self.hparams.eos_token!r}. Set `eos_token` to its end-of-text token"
                " (for example '</s>')."
            )
        return eos_id

    def _write_tokens(self, tokenizer: Tokenizer, eos_id: int, dtype: type) -> dict[str, dict[str, int]]:
        hp = self.hparams
        stats = {split: {"documents": 0, "tokens": 0} for split in _SPLITS}
        tmp = {split: self.cache_path / f"{split}.bin.{_unique_suffix()}.tmp" for split in _SPLITS}
        files = {split: open(path, "wb") for split, path in tmp.items()}
        pending: dict[str, list[str]] = {split: [] for split in _SPLITS}

        def flush(split: str) -> None:
            docs, pending[split] = pending[split], []
            if not docs:
                return
            encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
            pieces = []
            for encoding in encode(docs, add_special_tokens=False):
                pieces.append(np.asarray(encoding.ids, dtype=dtype))
                pieces.append(np.asarray([eos_id], dtype=dtype))
            flat = np.concatenate(pieces)
            files[split].write(flat.tobytes())
            stats[split]["documents"] += len(docs)
            stats[split]["tokens"] += int(flat.size)

        try:
            for split, doc in assign_splits(self.source, hp.val_fraction, hp.test_fraction):
                pending[split].append(doc)
                if len(pending[split]) >= _ENCODE_CHUNK_DOCS:
                    flush(split)
            for split in _SPLITS:
                flush(split)
        finally:
            for f in files.values():
                f.close()
        if stats["train"]["documents"] == 0:
            for path in tmp.values():
                path.unlink(missing_ok=True)
            raise self._empty_corpus_error()
        if stats["val"]["documents"] == 0:
            for path in tmp.values():
                path.unlink(missing_ok=True)
            total = stats["train"]["documents"] + stats["test"]["documents"]
            raise ValueError(
                f"The corpus has only {total} document(s), too few to hold out any for validation at"
                f" val_fraction={hp.val_fraction}. Raise `val_fraction` or add documents (`max_documents`,"
                " `max_chars`, more `data_files`)."
            )
        for split, path in tmp.items():
            os.replace(path, self.cache_path / f"{split}.bin")
        return stats

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the tokenizer and memory-map the token files (building them first if needed).

        Raises:
            ValueError: If ``seq_len`` is larger than a split, or the tokenizer does not fit in ``vocab_size``.
        """
        meta_path = self.cache_path / "meta.json"
        if not meta_path.is_file():
            self.prepare_data()
        meta = json.loads(meta_path.read_text())
        hp = self.hparams
        if meta["vocab_size"] > hp.vocab_size:
            raise ValueError(
                f"The tokenizer has {meta['vocab_size']} tokens but `vocab_size` is {hp.vocab_size}. Set"
                f" `vocab_size` (data and model) to at least {meta['vocab_size']}."
            )
        tokenizer_file = hp.tokenizer_path or str(self.cache_path / "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(os.path.expanduser(tokenizer_file))
        self.eos_id = int(meta["eos_id"])
        self.token_counts = {split: int(meta["splits"][split]["tokens"]) for split in _SPLITS}
        dtype = np.dtype(meta["dtype"])
        self.train_dataset = self._packed("train", dtype)
        self.val_dataset = self._packed("val", dtype)
        self.test_dataset = self._packed("test", dtype) if meta["splits"]["test"]["documents"] else self.val_dataset
        if stage == "test":
            rank_zero_info(f"Testing on {describe_splits(meta['splits'], only='test')}")

    def _packed(self, split: str, dtype: np.dtype) -> PackedSequences:
        path = self.cache_path / f"{split}.bin"
        count = self.token_counts[split]
        seq_len = self.hparams.seq_len
        if count < seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} is too large for the {split} split, which has only {count} tokens (one sample"
                f" needs seq_len + 1 = {seq_len + 1}). Lower `seq_len` or read more data (`max_chars`,"
                f" `max_documents`{', `val_fraction`' if split != 'train' else ''})."
            )
        return PackedSequences(path, seq_len, dtype=dtype, count=count)

    # ------------------------------------------------------------------ tokenizer helpers
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text token added). Call :meth:`setup` first."""
        return self._require_tokenizer().encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids. Call :meth:`setup` first."""
        return self._require_tokenizer().decode(list(ids), skip_special_tokens=False)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("The tokenizer is loaded in `setup()`. Call `prepare_data()` and `setup()` first.")
        return self.tokenizer

    # ------------------------------------------------------------------ loaders
    def replica_info(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this worker, from the attached Trainer (``(0, 1)`` without one)."""
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs:
            return 0, 1
        return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))

    def train_sampler(self, rank: int, world_size: int) -> ShardSampler:
        """The training sampler of worker ``rank`` among ``world_size`` (see :class:`ShardSampler`).

        Raises:
            ValueError: If a worker's shard would not fill a single batch.
        """
        dataset = self._require(self.train_dataset)
        sampler = ShardSampler(
            dataset, num_replicas=world_size, rank=rank, sharding=self.hparams.sharding, seed=self.hparams.seed
        )
        if len(sampler) < self.hparams.batch_size:
            raise ValueError(
                f"Each of the {world_size} worker(s) gets {len(sampler)} training sequences of"
                f" {self.hparams.seq_len + 1} tokens, fewer than batch_size={self.hparams.batch_size}. Lower"
                " `batch_size` or `seq_len`, or read more data (`max_chars`, `max_documents`)."
            )
        return sampler

    def build_train_dataloader(self, rank: int, world_size: int) -> ResumableDataLoader:
        """The training loader of worker ``rank`` among ``world_size``."""
        return ResumableDataLoader(
            self._require(self.train_dataset),
            batch_size=self.hparams.batch_size,
            sampler=self.train_sampler(rank, world_size),
            drop_last=True,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        return self.build_train_dataloader(*self.replica_info())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset)

    def _eval_loader(self, dataset: Optional[PackedSequences]) -> DataLoader:
        # Lightning shards evaluation across processes with its own DistributedSampler
        return DataLoader(
            self._require(dataset),
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )

    @staticmethod
    def _require(dataset: Optional[PackedSequences]) -> PackedSequences:
        if dataset is None:
            raise RuntimeError("The datasets are built in `setup()`. Call `setup()` before asking for a dataloader.")
        return dataset


def describe_splits(splits: dict[str, dict[str, int]], only: Optional[str] = None) -> str:
    """``train 13 documents / 171479 tokens, ...`` for the ``splits`` of a cache's ``meta.json``.

    A test split without documents is reported as what :meth:`LMDataModule.setup` uses in its place, the validation
    split: ``test = val 1 documents / 2847 tokens (no test documents held out, test_fraction=0)``.

    Args:
        splits: ``{split: {"documents": n, "tokens": n}}``.
        only: Describe this split alone.
    """
    parts = []
    for split in (only,) if only is not None else _SPLITS:
        counts = splits[split]
        if split == "test" and not counts["documents"]:
            val = splits["val"]
            parts.append(
                f"test = val {val['documents']} documents / {val['tokens']} tokens (no test documents held out, the"
                " test loader reuses the validation documents; raise `test_fraction` for a split of its own)"
            )
        else:
            parts.append(f"{split} {counts['documents']} documents / {counts['tokens']} tokens")
    return ", ".join(parts)


def _unique_suffix() -> str:
    """Distinguishes temporary files of processes that may share a file system (one per node runs prepare_data)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{_unique_suffix()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_main(argv: Optional[list[str]] = None) -> Path:
    """Build the token cache of a config's ``data`` section ahead of a (multi-GPU) run.

    ``python -m lightning_diloco.data configs/c4_150m.yaml [--cache_dir DIR]``. Useful when building the cache takes
    long: in a training run, the other processes wait for it at a barrier that times out after 30 minutes by default.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        The cache directory.
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m lightning_diloco.data", description=prepare_main.__doc__)
    parser.add_argument("config", help="A LightningCLI YAML config with a `data:` section.")
    parser.add_argument("--cache_dir", default=None, help="Override `data.cache_dir`.")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = yaml.safe_load(f) or {}
    data = config.get("data") or {}
    data = dict(data.get("init_args", data))
    if args.cache_dir is not None:
        data["cache_dir"] = args.cache_dir
    datamodule = LMDataModule(**data)
    datamodule.prepare_data()
    meta = json.loads((datamodule.cache_path / "meta.json").read_text())
    print(f"{datamodule.cache_path}: {describe_splits(meta['splits'])}")
    return datamodule.cache_path


if __name__ == "__main__":
    prepare_main()
