"""Tests of the language-modelling data pipeline."""

import json
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from helpers.launch import run_script
from lightning_diloco.data import (
    DocumentSource,
    LMDataModule,
    ResumableDataLoader,
    ShardSampler,
    assign_splits,
    stdlib_files,
    stdlib_root,
)

# the settings of tests/scripts/lm_shards.py: a small slice of the standard library
SMALL = {"max_chars": 400_000, "vocab_size": 384, "seq_len": 32, "batch_size": 4, "val_fraction": 0.1, "seed": 3}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_cache")


@pytest.fixture(scope="module")
def stdlib_dm(cache_dir):
    dm = LMDataModule(**SMALL, cache_dir=str(cache_dir))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- corpus and splits
def test_stdlib_corpus_is_sorted_and_offline():
    files = stdlib_files()
    assert len(files) > 100
    root = stdlib_root()
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative)
    assert "os.py" in relative
    assert not any("site-packages" in r for r in relative)
    # one document per non-empty file, in file order, capped by characters
    docs = list(DocumentSource(max_chars=50_000))
    assert 1 <= len(docs) < len(files)
    assert sum(len(d) for d in docs[:-1]) < 50_000 <= sum(len(d) for d in docs)


def test_held_out_documents_are_disjoint_and_spread():
    docs = [f"doc{i}" for i in range(1000)]
    tagged = list(assign_splits(docs, val_fraction=0.05, test_fraction=0.02))
    splits = {name: [d for s, d in tagged if s == name] for name in ("train", "val", "test")}
    assert [d for _, d in tagged] == docs
    assert len(splits["val"]) == 50
    assert 19 <= len(splits["test"]) <= 20
    assert sum(len(v) for v in splits.values()) == len(docs)
    # every window of 20 consecutive documents holds exactly one validation document
    flags = [s == "val" for s, _ in tagged]
    assert all(sum(flags[i : i + 20]) == 1 for i in range(0, 1000, 20))


# ---------------------------------------------------------------- tokenizer and cache
def test_tokenizer_round_trip(stdlib_dm):
    texts = [
        "def f(x):\n\treturn x ** 2  # square\r\n",
        "Grüße, 世界! \ufffd emoji: 🚀",
        "   leading and trailing spaces   ",
        read_first_stdlib_doc(),
    ]
    for text in texts:
        ids = stdlib_dm.encode(text)
        assert all(0 <= i < SMALL["vocab_size"] for i in ids)
        assert stdlib_dm.decode(ids) == text
    assert stdlib_dm.tokenizer.get_vocab_size() <= SMALL["vocab_size"]


def read_first_stdlib_doc() -> str:
    return next(iter(DocumentSource(max_documents=1)))


def test_packed_sequences(stdlib_dm):
    ds = stdlib_dm.train_dataset
    item = ds[0]
    assert item.dtype == torch.long and item.shape == (SMALL["seq_len"] + 1,)
    torch.testing.assert_close(ds[1][0], torch.as_tensor(int(ds.tokens[SMALL["seq_len"] + 1]), dtype=torch.long))
    assert len(ds) == stdlib_dm.token_counts["train"] // (SMALL["seq_len"] + 1)
    # one end-of-text token after every training document
    meta = json.loads((stdlib_dm.cache_path / "meta.json").read_text())
    assert int((np.asarray(ds.tokens) == stdlib_dm.eos_id).sum()) == meta["splits"]["train"]["documents"]
    assert ds.tokens[-1] == stdlib_dm.eos_id
    # DataLoader worker processes receive the file path, not a copy of the tokens
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1000
    assert torch.equal(clone[7], ds[7])
    batch = next(iter(stdlib_dm.val_dataloader()))
    assert batch.shape == (SMALL["batch_size"], SMALL["seq_len"] + 1)


def test_cache_is_reused(stdlib_dm, cache_dir):
    files = {name: stdlib_dm.cache_path / name for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json")}
    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    again = LMDataModule(**SMALL, cache_dir=str(cache_dir))
    again.prepare_data()
    assert again.cache_hit is True
    assert again.cache_path == stdlib_dm.cache_path
    again.setup("fit")
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == stamps
    assert torch.equal(again.train_dataset[5], stdlib_dm.train_dataset[5])
    # the token files do not depend on seq_len or batch size: a new shape reuses them
    other_shape = LMDataModule(**{**SMALL, "seq_len": 16, "batch_size": 2}, cache_dir=str(cache_dir))
    other_shape.prepare_data()
    assert other_shape.cache_hit is True
    # a new vocabulary is a new cache entry
    other_vocab = LMDataModule(**{**SMALL, "vocab_size": 400}, cache_dir=str(cache_dir))
    assert other_vocab.cache_path != stdlib_dm.cache_path


# ---------------------------------------------------------------- sharding
def _shards(dm, world, sharding, seed=3, epoch=0):
    shards = []
    for rank in range(world):
        sampler = ShardSampler(dm.train_dataset, num_replicas=world, rank=rank, sharding=sharding, seed=seed)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    return shards


@pytest.mark.parametrize("sharding", ["iid", "noniid"])
def test_shards_are_disjoint_and_equal(stdlib_dm, sharding):
    n = len(stdlib_dm.train_dataset)
    shards = _shards(stdlib_dm, 4, sharding)
    assert all(len(s) == n // 4 for s in shards)
    union = set().union(*map(set, shards))
    assert len(union) == 4 * (n // 4)
    assert union <= set(range(n))


@pytest.mark.parametrize("sharding", ["iid", "noniid"])
def test_sharding_is_deterministic(stdlib_dm, sharding):
    assert _shards(stdlib_dm, 2, sharding) == _shards(stdlib_dm, 2, sharding)
    assert _shards(stdlib_dm, 2, sharding, seed=4) != _shards(stdlib_dm, 2, sharding)
    # a new epoch reshuffles
    assert _shards(stdlib_dm, 2, sharding, epoch=1) != _shards(stdlib_dm, 2, sharding)


def test_noniid_shards_are_contiguous_clusters(stdlib_dm):
    n = len(stdlib_dm.train_dataset)
    world = 2
    block = n // world
    noniid = _shards(stdlib_dm, world, "noniid")
    iid = _shards(stdlib_dm, world, "iid")
    for rank, shard in enumerate(noniid):
        assert set(shard) == set(range(rank * block, (rank + 1) * block))
    # the blocks stay the same across epochs, only their order changes
    later = _shards(stdlib_dm, world, "noniid", epoch=5)
    assert [set(s) for s in later] == [set(s) for s in noniid]
    assert [set(s) for s in _shards(stdlib_dm, world, "iid", epoch=5)] != [set(s) for s in iid]

    # each worker of a non-iid run sees a different token distribution; iid workers see nearly the same one
    def distance(shards):
        hists = []
        for shard in shards:
            tokens = torch.cat([stdlib_dm.train_dataset[i] for i in shard])
            hists.append(torch.bincount(tokens, minlength=SMALL["vocab_size"]).double() / tokens.numel())
        return 0.5 * (hists[0] - hists[1]).abs().sum().item()

    assert distance(noniid) > 2 * distance(iid)


def test_train_loader_keeps_lightnings_hands_off(stdlib_dm):
    loader = stdlib_dm.build_train_dataloader(rank=1, world_size=2)
    # Lightning only injects its own sampler when the current one is not a DistributedSampler
    assert isinstance(loader.sampler, DistributedSampler)
    assert (loader.sampler.rank, loader.sampler.num_replicas) == (1, 2)
    assert len(loader) == len(stdlib_dm.train_dataset) // 2 // SMALL["batch_size"]
    # without a trainer the module trains on everything
    assert stdlib_dm.replica_info() == (0, 1)


@pytest.mark.parametrize("sharding", ["noniid"])
def test_two_process_run_uses_the_shards(stdlib_dm, cache_dir, tmp_path, sharding):
    """Under a real 2-process DDP run every rank trains on exactly its own ShardSampler shard."""
    run_script("lm_shards.py", str(tmp_path), str(cache_dir), sharding, "ddp")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["sampler"] == "ShardSampler"
        assert (result["sampler_rank"], result["sampler_replicas"]) == (rank, 2)
        expected_indices = _shards(stdlib_dm, 2, sharding)[rank]
        seen = torch.cat(result["seen"])
        expected = torch.stack([stdlib_dm.train_dataset[i] for i in expected_indices[: len(seen)]])
        assert len(result["seen"]) == 3
        assert torch.equal(seen, expected)


# ---------------------------------------------------------------- resuming
def test_loader_state_resumes_mid_epoch(stdlib_dm):
    full = [b.clone() for b in stdlib_dm.build_train_dataloader(0, 2)]
    loader = stdlib_dm.build_train_dataloader(0, 2)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed_samples": 3 * SMALL["batch_size"]}
    fresh = stdlib_dm.build_train_dataloader(0, 2)
    fresh.load_state_dict(state)
    tail = list(fresh)
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full, strict=True))
    # the state keeps counting from the resumed position; the next epoch starts from the beginning
    assert fresh.state_dict()["consumed_samples"] == len(full) * SMALL["batch_size"]
    fresh.sampler.set_epoch(1)
    assert len(list(fresh)) == len(full)


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return (self.weight * batch.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm, max_steps, root, ckpt_path=None, callbacks=()):
    module = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


def test_trainer_resumes_with_the_next_batch(cache_dir, tmp_path):
    dm = LMDataModule(**SMALL, cache_dir=str(cache_dir))
    uninterrupted = _fit(dm, 6, tmp_path / "a")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = _fit(LMDataModule(**SMALL, cache_dir=str(cache_dir)), 3, tmp_path / "b", callbacks=[checkpoint])
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.is_file()
    second = _fit(LMDataModule(**SMALL, cache_dir=str(cache_dir)), 6, tmp_path / "c", ckpt_path=str(ckpt))
    assert len(first) == 3 and len(second) == 3
    assert all(torch.equal(a, b) for a, b in zip(first + second, uninterrupted, strict=True))


# ---------------------------------------------------------------- local files through datasets.load_dataset
def test_local_json_text_parquet(tmp_path, stdlib_dm):
    docs = ["first document\nwith two lines", "second document", "third: ünïcödé"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    assert list(DocumentSource(data_files=str(jsonl), hf_cache_dir=tmp_path / "hf")) == docs
    assert DocumentSource(data_files=str(jsonl)).dataset == "json"

    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i, d in enumerate(docs):
        (text_dir / f"{i}.txt").write_text(d)
    # a text file is one document, not one per line
    source = DocumentSource(data_files=str(text_dir / "*.txt"), hf_cache_dir=tmp_path / "hf")
    assert source.dataset == "text"
    assert list(source) == docs

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": docs, "n": [1, 2, 3]}), parquet)
    assert list(DocumentSource(data_files=str(parquet), text_column="body", hf_cache_dir=tmp_path / "hf")) == docs
    with pytest.raises(ValueError, match="text_column"):
        list(DocumentSource(data_files=str(parquet), hf_cache_dir=tmp_path / "hf"))

    # the whole pipeline on local JSON, with a given tokenizer (nothing is trained)
    tokenizer_file = tmp_path / "tokenizer.json"
    stdlib_dm.tokenizer.save(str(tokenizer_file))
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"text": f"document {i}: " + "spam and eggs " * 20}) + "\n" for i in range(40)))
    dm = LMDataModule(
        data_files=str(many),
        tokenizer_path=str(tokenizer_file),
        vocab_size=SMALL["vocab_size"],
        seq_len=16,
        batch_size=2,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert not (dm.cache_path / "tokenizer.json").exists()
    assert dm.decode(dm.train_dataset[0].tolist()).startswith("document 0: spam")
    assert len(dm.val_dataset) > 0


# ---------------------------------------------------------------- malformed input
def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LMDataModule(data_files=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No file matches"):
        LMDataModule(data_files=str(tmp_path / "*.parquet"), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        LMDataModule(tokenizer_path=str(tmp_path / "tokenizer.json"), cache_dir=str(tmp_path))
    _write(tmp_path / "data.xyz", b"hello")
    with pytest.raises(ValueError, match="builder"):
        LMDataModule(data_files=str(tmp_path / "data.xyz"), cache_dir=str(tmp_path))


def test_empty_corpus(tmp_path):
    _write(tmp_path / "a.txt", b"")
    _write(tmp_path / "b.txt", b"   \n\n  ")
    dm = LMDataModule(data_files=str(tmp_path / "*.txt"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no training documents"):
        dm.prepare_data()
    assert not (dm.cache_path / "meta.json").exists()


def test_too_few_documents_for_validation(tmp_path):
    _write(tmp_path / "one.txt", b"a single document " * 50)
    dm = LMDataModule(data_files=str(tmp_path / "one.txt"), val_fraction=0.05, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="val_fraction"):
        dm.prepare_data()
    # the trained tokenizer is kept; the token files written before the check are not
    assert sorted(p.name for p in dm.cache_path.iterdir()) == ["tokenizer.json"]


def test_interrupted_build_leaves_no_partial_files(tmp_path, monkeypatch, stdlib_dm):
    """A build that fails while writing the token files leaves nothing a later run could take for a finished file."""
    from lightning_diloco.data import tokens

    for i in range(40):
        _write(tmp_path / f"{i:02d}.txt", f"document {i} ".encode() * 20)
    tokenizer_file = tmp_path / "tokenizer.json"
    stdlib_dm.tokenizer.save(str(tokenizer_file))
    settings = {
        "data_files": str(tmp_path / "*.txt"),
        "tokenizer_path": str(tokenizer_file),
        "vocab_size": SMALL["vocab_size"],
        "seq_len": 8,
        "batch_size": 2,
        "val_fraction": 0.1,
        "cache_dir": str(tmp_path / "cache"),
    }
    assign_all = tokens.assign_splits

    def interrupted(*args):
        for n, tagged in enumerate(assign_all(*args)):
            if n == 30:
                raise RuntimeError("interrupted")
            yield tagged

    monkeypatch.setattr(tokens, "_ENCODE_CHUNK_DOCS", 4)  # some tokens reach the files before the failure
    monkeypatch.setattr(tokens, "assign_splits", interrupted)
    dm = LMDataModule(**settings)
    with pytest.raises(RuntimeError, match="interrupted"):
        dm.prepare_data()
    assert list(dm.cache_path.iterdir()) == []
    monkeypatch.undo()
    again = LMDataModule(**settings)
    assert again.cache_path == dm.cache_path
    again.prepare_data()
    assert again.cache_hit is False
    assert sorted(p.name for p in again.cache_path.iterdir()) == ["meta.json", "test.bin", "train.bin", "val.bin"]
    again.setup("fit")
    assert len(again.train_dataset) > 0


def test_invalid_utf8_is_replaced(tmp_path):
    bad = b"caf\xe9 au lait \xff\xfe and more text " * 20
    _write(tmp_path / "a.txt", bad)
    _write(tmp_path / "b.txt", b"valid text " * 40)
    texts = list(DocumentSource(data_files=str(tmp_path / "*.txt"), hf_cache_dir=tmp_path / "hf"))
    assert "\ufffd" in texts[0] and texts[0].startswith("caf\ufffd au lait")
    jsonl = _write(tmp_path / "c.jsonl", b'{"text": "ok \xff bytes"}\n{"text": "fine"}\n')
    assert list(DocumentSource(data_files=str(jsonl), hf_cache_dir=tmp_path / "hf")) == ["ok \ufffd bytes", "fine"]
    # the whole pipeline survives it
    dm = LMDataModule(
        data_files=str(tmp_path / "*.txt"),
        vocab_size=300,
        seq_len=8,
        batch_size=2,
        val_fraction=0.5,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")
    decoded = [dm.decode(np.asarray(ds.tokens).tolist()) for ds in (dm.train_dataset, dm.val_dataset)]
    assert any("caf\ufffd au lait" in text for text in decoded)


def test_seq_len_and_batch_too_large(tmp_path):
    for i in range(4):
        _write(tmp_path / f"{i}.txt", f"document number {i} ".encode() * 10)
    common = {"data_files": str(tmp_path / "*.txt"), "vocab_size": 300, "val_fraction": 0.25}
    dm = LMDataModule(**common, seq_len=100_000, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="seq_len=100000 is too large"):
        dm.setup("fit")
    dm = LMDataModule(**common, seq_len=8, batch_size=1000, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size=1000"):
        dm.train_dataloader()
    # a given tokenizer larger than the embedding table
    dm = LMDataModule(**common, seq_len=8, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    tokenizer_file = tmp_path / "tokenizer.json"
    dm.tokenizer.save(str(tokenizer_file))
    size = dm.tokenizer.get_vocab_size()
    assert size > 257
    small = LMDataModule(
        **{**common, "vocab_size": 257}, tokenizer_path=str(tokenizer_file), seq_len=8, cache_dir=str(tmp_path / "c2")
    )
    with pytest.raises(ValueError, match=f"at least {size}"):
        small.setup("fit")


@pytest.mark.parametrize("sharding", ["iid", "noniid"])
def test_islands_of_unequal_sizes_share_the_data_without_overlap(stdlib_dm, sharding):
    """Three islands (of 1, 2 and 1 processes) take shards 0, 1, 2 of 3; each island's processes split its shard."""
    n, sizes = len(stdlib_dm.train_dataset), [1, 2, 1]
    parts, before = [], stdlib_dm.hparams.sharding
    stdlib_dm.hparams.sharding = sharding
    try:
        for shard, world in enumerate(sizes):
            stdlib_dm.hparams.shard, stdlib_dm.hparams.num_shards = shard, 3
            mine = [list(stdlib_dm.train_sampler(rank, world)) for rank in range(world)]
            assert all(len(p) == (n // 3) // world for p in mine)
            if sharding == "noniid":  # an island's data is its own contiguous block
                assert set().union(*map(set, mine)) <= set(range(shard * (n // 3), (shard + 1) * (n // 3)))
            parts += mine
        # one shard of one: exactly the sampler of a single run
        stdlib_dm.hparams.shard, stdlib_dm.hparams.num_shards = 0, 1
        whole = ShardSampler(stdlib_dm.train_dataset, num_replicas=2, rank=1, sharding=sharding,
                             seed=stdlib_dm.hparams.seed)
        assert list(stdlib_dm.train_sampler(1, 2)) == list(whole)
    finally:
        stdlib_dm.hparams.shard, stdlib_dm.hparams.num_shards, stdlib_dm.hparams.sharding = 0, 1, before
    everything = [i for p in parts for i in p]
    assert len(everything) == len(set(everything))  # no sample is in two processes' parts, in one island or across


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        LMDataModule(val_fraction=0.0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sharding"):
        LMDataModule(sharding="random", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size"):
        LMDataModule(vocab_size=100, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data_files"):
        LMDataModule(dataset="stdlib", data_files=str(tmp_path / "x.txt"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="iid"):
        ShardSampler(list(range(10)), sharding="clustered")
    with pytest.raises(ValueError, match="shard=i, num_shards=n"):
        LMDataModule(shard=2, num_shards=2, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="part"):
        ShardSampler(list(range(10)), num_parts=2, part=2)
    with pytest.raises(TypeError, match="ShardSampler"):
        iter(ResumableDataLoader(list(range(10)), batch_size=2))
