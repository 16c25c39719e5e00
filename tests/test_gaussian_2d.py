"""The L²-VSD paper's 2D Gaussian experiment (§3.2, App. F): its qualitative findings, reproduced."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from amortized3d.toys.gaussian_2d import METHODS, ToyConfig, compare, format_table, gaussian_w2, run
from conftest import ROOT

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, int], dict]:
    """Every method, same seeds, same number of steps (the library defaults)."""
    return {(r["method"], r["config"]["seed"]): r for r in compare(METHODS, SEEDS, ToyConfig())}


def _mean(results: dict, method: str, key: str) -> float:
    return sum(results[method, s][key] for s in SEEDS) / len(SEEDS)


def test_sds_collapses_the_variance(results):
    """SDS is mode seeking (ProlificDreamer §3.3): Cov_q -> ~0 at p's mode, while p's is not;
    the variational objective keeps q spread (with a score model that keeps up: L²-VSD)."""
    for s in SEEDS:
        sds, l2vsd = results["sds", s], results["l2vsd", s]
        assert sds["cov_q_trace"] < 0.03 * sds["cov_p_trace"]
        assert sds["mean_error"] < 0.3
        assert l2vsd["cov_q_trace"] > 0.4 * l2vsd["cov_p_trace"]


def test_linearized_lookahead_gets_closer_to_p_than_vsd(results):
    """VSD's score model characterises an earlier q (§3.2); L²-VSD's first-order lookahead (§4.2)
    corrects it: closer to p after the same number of steps, on every seed."""
    for s in SEEDS:
        assert results["l2vsd", s]["w2"] < 0.8 * results["vsd", s]["w2"]
    for key in ("mean_error", "cov_error", "w2"):
        assert _mean(results, "l2vsd", key) < 0.7 * _mean(results, "vsd", key)


def test_one_small_lookahead_step_is_not_enough(results):
    """L-VSD with the same slow score model takes one more small step: close to VSD, far from L²-VSD."""
    assert _mean(results, "lvsd", "w2") < 1.05 * _mean(results, "vsd", "w2")
    assert _mean(results, "l2vsd", "w2") < 0.7 * _mean(results, "lvsd", "w2")


def test_table_lists_every_method(results):
    table = format_table(list(results.values()))
    assert all(m in table for m in METHODS) and "W2" in table


def test_deterministic_given_a_seed():
    cfg = ToyConfig(steps=6, seed=3)
    a, b = run("l2vsd", cfg, log_every=2), run("l2vsd", cfg, log_every=2)
    assert a == b and len(a["trajectory"]) == 4
    assert run("l2vsd", replace(cfg, seed=4))["w2"] != a["w2"]


def test_gaussian_w2_closed_form():
    m, c = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    assert gaussian_w2(m, c, m, c) == pytest.approx(0.0, abs=1e-6)
    eye = torch.eye(2, dtype=torch.float64)
    assert gaussian_w2(m, eye, torch.zeros(2, dtype=torch.float64), eye) == pytest.approx(5 ** 0.5)
    assert gaussian_w2(m, 4 * eye, m, eye) == pytest.approx(2 ** 0.5)  # sqrt(sum (2 - 1)^2)


def test_script_prints_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gaussian_2d_script", ROOT / "scripts" / "gaussian_2d.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "g2d.json"
    script.main(["--steps", "3", "--seeds", "0", "--out", str(out), "--eta", "0.5", "--log-every", "1"])
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["runs"]] == list(METHODS)
    assert report["config"]["eta"] == 0.5 and len(report["runs"][0]["trajectory"]) == 3
    assert "l2vsd" in capsys.readouterr().out
