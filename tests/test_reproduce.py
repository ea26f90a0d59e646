"""Smoke test of ``python -m benchmarks.reproduce``: every run of the plan takes a few steps, every table and plot appears."""

import csv
import json
import sys
from pathlib import Path

import pytest

from helpers.launch import ROOT, run

REPRODUCE = [sys.executable, "-m", "benchmarks.reproduce"]
TABLES = ("table2", "h_sweep", "workers", "outer_optimizer", "iid_noniid", "compression")

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    run([*REPRODUCE, "--size", "smoke", "--out", str(out)], timeout=600, cwd=ROOT)
    return out


def test_every_table_and_plot(smoke: Path) -> None:
    tables = (smoke / "tables.md").read_text()
    for stem in TABLES:
        png = smoke / f"{stem}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"![{stem}]({stem}.png)" in tables
    for title in ("Table 2", "Fig. 4", "Table 3", "Fig. 6", "Fig. 5", "Compression", "2025-2026 options"):
        assert title in tables
    assert "Not finished" not in tables
    rows = [line.split(" | ") for line in tables.splitlines() if line.startswith("| ") and "ppl" not in line]
    assert len(rows) >= 20
    for cells in rows:  # the second column is our validation perplexity
        assert cells[1] == "not run" or float(cells[1]) > 1, cells


def test_raw_numbers(smoke: Path) -> None:
    summary = json.loads((smoke / "results.json").read_text())
    assert not summary["missing"]
    runs = summary["runs"]
    from benchmarks import _repro_lib as lib

    _, plan = lib.build_plan("smoke", smoke)
    assert set(runs) == {spec["name"] for spec in plan}
    for name, result in runs.items():
        assert result["final_val_ppl"] > 1, name
        steps = [point["step"] for point in result["curve"]]
        assert steps[0] == 0 and steps[-1] == lib.SIZES["smoke"]["steps"], name
        assert all(point["bytes"] >= 0 for point in result["curve"]), name
    k = lib.SIZES["smoke"]["k"]
    assert runs["single"]["bytes_sent"] == 0
    assert runs["diloco_k1"]["bytes_sent"] == 0
    # DDP all-reduces every step, DiLoCo every H steps, compressed pseudo-gradients are smaller
    assert runs[f"ddp_k{k}"]["bytes_sent"] > runs["diloco_main"]["bytes_sent"] > runs["comp_int8"]["bytes_sent"] > 0
    assert runs["comp_e3m0"]["bytes_sent"] < runs["comp_int8"]["bytes_sent"]
    assert runs["comp_int2_ef"]["bytes_sent"] < runs["comp_e3m0"]["bytes_sent"]
    assert runs["muon_int2_ef"]["bytes_sent"] == runs["comp_int2_ef"]["bytes_sent"]
    assert runs["eager"]["outer_syncs"] == runs["diloco_main"]["outer_syncs"]  # one per round, at the end too
    assert runs["diloco_main"]["outer_syncs"] == lib.SIZES["smoke"]["steps"] // lib.SIZES["smoke"]["inner_steps"]
    with open(smoke / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["name"] for row in rows} == {"pretrain", *runs}
    with open(smoke / "curves.csv") as f:
        assert {row["name"] for row in csv.DictReader(f)} == {"pretrain", *runs}


def test_finished_runs_are_skipped(smoke: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (smoke / "runs").glob("*.json")}
    proc = run([*REPRODUCE, "--size", "smoke", "--out", str(smoke), "--no-report"], timeout=300, cwd=ROOT)
    assert "launch" not in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (smoke / "runs").glob("*.json")} == before
