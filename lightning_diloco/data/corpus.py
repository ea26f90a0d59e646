"""The documents of a corpus and their held-out splits.

:class:`DocumentSource` reads documents, in a fixed order, from the offline standard-library corpus (the ``.py``,
``.txt`` and ``.rst`` files of the running Python, which every machine has), from local files, or from a hub dataset
streamed by :func:`datasets.load_dataset`; :func:`assign_splits` then tags each one ``train``, ``val`` or ``test``.
Both are deterministic, so every process and every run sees the same corpus and the same splits.
"""

import glob
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

#: Name of the offline default corpus (the Python standard library's own sources).
STDLIB = "stdlib"
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
    found: list[Path] = []
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
