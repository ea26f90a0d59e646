"""The byte-level BPE tokenizer and the token cache built once per corpus and settings.

:class:`TokenCache` owns ``cache_dir/<corpus>-<hash>/``: the tokenizer (given, or a byte-level BPE trained by
:func:`train_bpe_tokenizer` on the training documents), one flat binary token file per split and ``meta.json``, written
last, which marks the entry as complete. The hash covers everything that decides the tokens, so a second run with the
same settings starts at once; every file is written with :func:`~lightning_diloco.io.atomic_write`, so a killed build
never leaves a file that a later run would take for a finished one.
"""

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lightning_diloco.data.corpus import DocumentSource, assign_splits
from lightning_diloco.io import atomic_write

#: Environment variable that overrides the default cache directory.
CACHE_ENV = "LIGHTNING_DILOCO_CACHE"
#: The splits of every cache entry, in the order :func:`describe_splits` reports them.
SPLITS = ("train", "val", "test")
#: Bumped whenever the layout of the cached files changes.
_CACHE_FORMAT = 1
# documents tokenized per call of the (multi-threaded) tokenizer
_ENCODE_CHUNK_DOCS = 256


def default_cache_dir() -> Path:
    """``$LIGHTNING_DILOCO_CACHE`` if set, else ``~/.cache/lightning_diloco``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lightning_diloco")).expanduser()


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


def describe_splits(splits: dict[str, dict[str, int]], only: Optional[str] = None) -> str:
    """``train 13 documents / 171479 tokens, ...`` for the ``splits`` of a cache's ``meta.json``.

    A test split without documents is reported as what :meth:`~lightning_diloco.data.LMDataModule.setup` uses in its
    place, the validation split: ``test = val 1 documents / 2847 tokens (no test documents held out, test_fraction=0)``.

    Args:
        splits: ``{split: {"documents": n, "tokens": n}}``.
        only: Describe this split alone.
    """
    parts = []
    for split in (only,) if only is not None else SPLITS:
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


class TokenCache:
    """The tokenizer and the token files of one corpus under given settings, in ``root/<corpus>-<hash>/``.

    Args:
        source: The documents.
        root: Directory holding one entry per corpus and settings.
        val_fraction: Fraction of documents held out for validation.
        test_fraction: Fraction of documents held out for testing.
        tokenizer_path: A ``tokenizer.json`` to use instead of training one.
        vocab_size: Size of the trained BPE vocabulary (ignored with ``tokenizer_path``).
        eos_token: End-of-text token put after every document.
        tokenizer_train_chars: Train the BPE on at most this many characters of training text (``None``: all).
    """

    def __init__(
        self,
        source: DocumentSource,
        root: Path,
        val_fraction: float,
        test_fraction: float,
        tokenizer_path: Optional[str],
        vocab_size: int,
        eos_token: str,
        tokenizer_train_chars: Optional[int],
    ) -> None:
        self.source = source
        self.root = root
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token = eos_token
        self.tokenizer_train_chars = tokenizer_train_chars
        self._path: Optional[Path] = None

    @property
    def path(self) -> Path:
        """The entry's directory; its name hashes :meth:`fingerprint`."""
        if self._path is None:
            key = json.dumps(self.fingerprint(), sort_keys=True, default=str)
            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            self._path = self.root / f"{self.source.name}-{digest}"
        return self._path

    @property
    def meta_path(self) -> Path:
        """``meta.json``: the token counts and element type of the splits; present once the entry is complete."""
        return self.path / "meta.json"

    @property
    def tokenizer_file(self) -> str:
        """The given ``tokenizer_path``, else the entry's trained ``tokenizer.json``."""
        return os.path.expanduser(self.tokenizer_path or str(self.path / "tokenizer.json"))

    def split_file(self, split: str) -> Path:
        """The flat token file of ``split`` (``train``, ``val`` or ``test``)."""
        return self.path / f"{split}.bin"

    def fingerprint(self) -> dict[str, Any]:
        """Everything that decides the cached files: source, caps, split fractions, tokenizer."""
        if self.tokenizer_path is not None:
            tokenizer: dict[str, Any] = {"file_sha256": _sha256_file(os.path.expanduser(self.tokenizer_path))}
        else:
            tokenizer = {"bpe_vocab_size": self.vocab_size, "train_chars": self.tokenizer_train_chars}
        return {
            "format": _CACHE_FORMAT,
            "source": self.source.fingerprint(),
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "eos_token": self.eos_token,
            "tokenizer": tokenizer,
        }

    def build(self) -> None:
        """Write the tokenizer (unless given), the token file of every split, and last ``meta.json``.

        Raises:
            ValueError: If the corpus is empty, has too few documents for validation, or the tokenizer lacks
                ``eos_token``.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        rank_zero_info(f"Building the token cache in {self.path} ...")
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
            "fingerprint": self.fingerprint(),
        }
        with atomic_write(self.meta_path, "w") as f:
            f.write(json.dumps(meta, indent=1, default=str))
        rank_zero_info(f"Token cache ready: {describe_splits(stats)}")

    def _build_tokenizer(self) -> Tokenizer:
        """The given tokenizer, the one trained before, or a new one trained on the training documents."""
        if self.tokenizer_path is not None:
            return Tokenizer.from_file(self.tokenizer_file)
        path = self.path / "tokenizer.json"
        if path.is_file():
            return Tokenizer.from_file(str(path))
        tokenizer = train_bpe_tokenizer(self._tokenizer_training_texts(), self.vocab_size, self.eos_token)
        with atomic_write(path, "w") as f:
            f.write(tokenizer.to_str(pretty=True))  # what `Tokenizer.save` writes
        return tokenizer

    def _tokenizer_training_texts(self) -> Iterator[str]:
        """The training documents, up to ``tokenizer_train_chars`` characters."""
        budget = self.tokenizer_train_chars
        seen = 0
        for split, doc in assign_splits(self.source, self.val_fraction, self.test_fraction):
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
            f" val_fraction={self.val_fraction}). Point `data_files`/`dataset` at a non-empty corpus or"
            " raise `max_documents`/`max_chars`."
        )

    def _eos_id(self, tokenizer: Tokenizer) -> int:
        eos_id = tokenizer.token_to_id(self.eos_token)
        if eos_id is None:
            raise ValueError(
                f"The tokenizer has no token {self.eos_token!r}. Set `eos_token` to its end-of-text token"
                " (for example '</s>')."
            )
        return eos_id

    def _write_tokens(self, tokenizer: Tokenizer, eos_id: int, dtype: type) -> dict[str, dict[str, int]]:
        """Tokenize every document into its split's file; no file is replaced unless all splits are usable."""
        stats = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
        pending: dict[str, list[str]] = {split: [] for split in SPLITS}
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        with ExitStack() as stack:
            files = {split: stack.enter_context(atomic_write(self.split_file(split))) for split in SPLITS}

            def flush(split: str) -> None:
                docs, pending[split] = pending[split], []
                if not docs:
                    return
                pieces: list[np.ndarray] = []
                for encoding in encode(docs, add_special_tokens=False):
                    pieces.append(np.asarray(encoding.ids, dtype=dtype))
                    pieces.append(np.asarray([eos_id], dtype=dtype))
                flat = np.concatenate(pieces)
                files[split].write(flat.tobytes())
                stats[split]["documents"] += len(docs)
                stats[split]["tokens"] += int(flat.size)

            for split, doc in assign_splits(self.source, self.val_fraction, self.test_fraction):
                pending[split].append(doc)
                if len(pending[split]) >= _ENCODE_CHUNK_DOCS:
                    flush(split)
            for split in SPLITS:
                flush(split)
            # raising here deletes the temporary files and leaves the entry without token files
            if stats["train"]["documents"] == 0:
                raise self._empty_corpus_error()
            if stats["val"]["documents"] == 0:
                total = stats["train"]["documents"] + stats["test"]["documents"]
                raise ValueError(
                    f"The corpus has only {total} document(s), too few to hold out any for validation at"
                    f" val_fraction={self.val_fraction}. Raise `val_fraction` or add documents (`max_documents`,"
                    " `max_chars`, more `data_files`)."
                )
        return stats


def _sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
