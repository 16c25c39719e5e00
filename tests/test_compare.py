"""The guidance x generator comparison: its Markdown table, and one real cell end to end (slow)."""
from __future__ import annotations

import json

import pytest

from amortized3d.evaluation.compare import RunResult, compare, markdown_table
from conftest import ROOT, TINY


def _run(tmp_path, generator, guidance, r_at_1, psnr, sps, rc=0) -> RunResult:
    out = tmp_path / f"{generator}-{guidance}"
    out.mkdir()
    if rc == 0:
        oracle = {"train": {"overall": {"r_at_1": r_at_1, "psnr": psnr}},
                  "val": {"held_out": {"r_at_1": r_at_1 / 2, "psnr": psnr - 1}}}
        (out / "metrics.json").write_text(json.dumps({"oracle": oracle, "training": {"steps": 10,
                                                                                      "seconds_per_step": sps}}))
    return RunResult(generator, guidance, out, wall_seconds=120.0, returncode=rc)


def test_markdown_table_rows_ratios_and_failures(tmp_path):
    results = [_run(tmp_path, "hyper_ingp", "sds", 0.9, 25.0, 0.5), _run(tmp_path, "hyper_ingp", "vsd", 0.8, 24.0, 1.0),
               _run(tmp_path, "ingp", "sds", 0.0, 0.0, 0.0, rc=1)]
    lines = markdown_table(results).splitlines()
    assert len(lines) == 5 and lines[1].count("|") == lines[0].count("|")
    assert lines[2] == "| hyper_ingp | sds | 0.900 | 25.00 | 0.450 | 24.00 | 0.50 | 1.00 | 2.0 |"
    assert lines[3] == "| hyper_ingp | vsd | 0.800 | 24.00 | 0.400 | 23.00 | 1.00 | 2.00 | 2.0 |"
    assert lines[4].startswith("| ingp | sds (failed: rc 1) | — | — | — | — |")


@pytest.mark.slow
def test_one_real_cell(tmp_path, cache_dir):
    overrides = [o for o in TINY if not o.startswith("~callbacks.progress_bar")] + [
        f"paths.cache_dir={cache_dir}", "evaluation.splits=[train,val]", "callbacks.progress_bar=null"]
    table = compare(ROOT, tmp_path, ["hyper_ingp"], ["sds"], overrides)
    row = table.splitlines()[2]
    assert row.startswith("| hyper_ingp | sds | ") and "failed" not in row and "—" not in row.split("|")[3]
    assert (tmp_path / "comparison.md").read_text().endswith(table + "\n")
