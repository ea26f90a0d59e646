"""The LightningDataModule that ties corpus, token cache and loaders together for GPT training.

:class:`LMDataModule` is what a run configures (``data:`` in a LightningCLI config): its arguments choose the corpus
(:mod:`~lightning_diloco.data.corpus`), the tokenizer and cache (:mod:`~lightning_diloco.data.tokens`) and the
sequences, shards and loaders (:mod:`~lightning_diloco.data.sampling`). Lightning calls its ``prepare_data`` to build
the cache once per node and its ``setup`` to memory-map the cache on every process.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lightning_diloco.data.corpus import DocumentSource
from lightning_diloco.data.sampling import PackedSequences, ResumableDataLoader, ShardSampler
from lightning_diloco.data.tokens import SPLITS, TokenCache, default_cache_dir, describe_splits


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
        shard: Which part of the training data this run trains on, when several independent runs train one model
            (islands mode: island ``i`` of ``n`` takes ``shard=i, num_shards=n``); its processes split it further.
        num_shards: Into how many parts the training data is cut for those runs (1: this run has all of it).
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
        shard: int = 0,
        num_shards: int = 1,
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
        if not (isinstance(num_shards, int) and num_shards >= 1 and isinstance(shard, int) and 0 <= shard < num_shards):
            raise ValueError(
                f"`shard` must be in [0, num_shards) and `num_shards` >= 1, got shard={shard}, num_shards={num_shards}."
                " In islands mode give island i of n `shard=i, num_shards=n`."
            )
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
        self._token_cache: Optional[TokenCache] = None

    # ------------------------------------------------------------------ cache
    @property
    def token_cache(self) -> TokenCache:
        """The tokenizer and token files of this corpus and these settings (see :class:`TokenCache`)."""
        if self._token_cache is None:
            hp = self.hparams
            self._token_cache = TokenCache(
                self.source,
                self.cache_root,
                val_fraction=hp.val_fraction,
                test_fraction=hp.test_fraction,
                tokenizer_path=hp.tokenizer_path,
                vocab_size=hp.vocab_size,
                eos_token=hp.eos_token,
                tokenizer_train_chars=hp.tokenizer_train_chars,
            )
        return self._token_cache

    @property
    def cache_path(self) -> Path:
        """Directory holding this corpus' tokenizer and token files."""
        return self.token_cache.path

    def prepare_data(self) -> None:
        """Build the tokenizer and token files unless they are cached (Lightning calls this on one process per node).

        Raises:
            FileNotFoundError: If a data file does not exist.
            ValueError: If the corpus is empty or has too few documents for the held-out splits.
        """
        if self.token_cache.meta_path.is_file():
            self.cache_hit = True
            return
        self.cache_hit = False
        self.token_cache.build()

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the tokenizer and memory-map the token files (building them first if needed).

        Raises:
            ValueError: If ``seq_len`` is larger than a split, or the tokenizer does not fit in ``vocab_size``.
        """
        cache = self.token_cache
        if not cache.meta_path.is_file():
            self.prepare_data()
        meta = json.loads(cache.meta_path.read_text())
        hp = self.hparams
        if meta["vocab_size"] > hp.vocab_size:
            raise ValueError(
                f"The tokenizer has {meta['vocab_size']} tokens but `vocab_size` is {hp.vocab_size}. Set"
                f" `vocab_size` (data and model) to at least {meta['vocab_size']}."
            )
        self.tokenizer = Tokenizer.from_file(cache.tokenizer_file)
        self.eos_id = int(meta["eos_id"])
        self.token_counts = {split: int(meta["splits"][split]["tokens"]) for split in SPLITS}
        dtype = np.dtype(meta["dtype"])
        self.train_dataset = self._packed("train", dtype)
        self.val_dataset = self._packed("val", dtype)
        self.test_dataset = self._packed("test", dtype) if meta["splits"]["test"]["documents"] else self.val_dataset
        if stage == "test":
            rank_zero_info(f"Testing on {describe_splits(meta['splits'], only='test')}")

    def _packed(self, split: str, dtype: np.dtype) -> PackedSequences:
        path = self.token_cache.split_file(split)
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
        hp = self.hparams
        if hp.num_shards == 1:
            sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank, sharding=hp.sharding, seed=hp.seed)
        else:  # this run's shard among independent runs, split among its processes
            sampler = ShardSampler(dataset, num_replicas=hp.num_shards, rank=hp.shard, sharding=hp.sharding,
                                   seed=hp.seed, num_parts=world_size, part=rank)
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
