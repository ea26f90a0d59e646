"""Language-modelling data: documents, a byte-level BPE tokenizer, and packed fixed-length token sequences.

One module per step: :mod:`~lightning_diloco.data.corpus` (documents and held-out splits),
:mod:`~lightning_diloco.data.tokens` (tokenizer and token cache), :mod:`~lightning_diloco.data.sampling` (sequences,
shards, resumable loader), :mod:`~lightning_diloco.data.datamodule` (:class:`LMDataModule`, which runs them) and
:mod:`~lightning_diloco.data.prepare` (``python -m lightning_diloco.data CONFIG``, which builds the cache ahead of a
run). The public names of all of them are importable from here.

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

from lightning_diloco.data.corpus import (
    STDLIB,
    DocumentSource,
    assign_splits,
    infer_builder,
    read_text,
    stdlib_files,
    stdlib_root,
)
from lightning_diloco.data.datamodule import LMDataModule
from lightning_diloco.data.prepare import prepare_main
from lightning_diloco.data.sampling import PackedSequences, ResumableDataLoader, ShardSampler
from lightning_diloco.data.tokens import CACHE_ENV, TokenCache, default_cache_dir, describe_splits, train_bpe_tokenizer

__all__ = [
    "CACHE_ENV",
    "STDLIB",
    "DocumentSource",
    "LMDataModule",
    "PackedSequences",
    "ResumableDataLoader",
    "ShardSampler",
    "TokenCache",
    "assign_splits",
    "default_cache_dir",
    "describe_splits",
    "infer_builder",
    "prepare_main",
    "read_text",
    "stdlib_files",
    "stdlib_root",
    "train_bpe_tokenizer",
]
