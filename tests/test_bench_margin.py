"""``robbench bench --margin`` on tiny settings: the split adds up, samples are accounted for, margins are
compared across backends (a backend that decides differently is caught), and --json carries the
environment. Correctness only: no timing is asserted."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from robbench import bench, montecarlo
from robbench.paper import margin_bench
from robbench.cli import main
from robbench.plugins import get_registries

TINY = {"dataset": "digits", "points": 2, "r": 1.0,  # r = 4 leaves every 8x8 digit robust at the cap (censored)
        "model_params": {"beta_vae": {"beta": [1.0]}},
        "train": {"epochs": 1},
        "estimator_params": {"margin": {"samples_max": 1024, "tolerance": 0.5}}}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_margin_rows_split_adds_up_and_samples_are_accounted(tiny_config):
    cfg = margin_bench.margin_config(tiny_config)
    rows = margin_bench.margin_rows(cfg, get_registries(), ["torch"], repeats=2, peaks={"fp32": 100.0})
    assert [(r.backend, r.repeat) for r in rows] == [("torch", 0), ("torch", 1)]
    for r in rows:
        assert r.whole_s == pytest.approx(r.attack_s + r.montecarlo_s + r.other_s)
        assert r.attack_s > 0 and r.montecarlo_s > 0 and r.mc_calls > 0
        # every decoder sample of the margin job goes through count_within and is counted per point
        assert r.mc_samples == pytest.approx(r.samples_per_point * r.points)
        assert r.gflop > 0 and r.peak_fraction == pytest.approx(r.gflops / 100.0)
        assert r.margins == rows[0].margins and all(m is not None for m in r.margins)


def test_different_margins_across_backends_are_an_error(tiny_config, fresh_plugins, miscounting_backend):
    cfg = margin_bench.margin_config(tiny_config)
    cfg.estimator_params["margin"] = {**cfg.estimator_params["margin"], "samples_initial": 8, "samples_max": 8}
    with pytest.raises(AssertionError, match=f"backend {miscounting_backend} .* gives point"):
        margin_bench.margin_rows(cfg, fresh_plugins.get_registries(), ["torch", miscounting_backend], repeats=1)


def test_cli_margin_json_carries_rows_summary_and_environment(tiny_config, tmp_path):
    out = tmp_path / "bench.json"
    backends = ",".join(montecarlo.available_backends("cpu"))
    assert main(["bench", "--margin", "--margin-config", str(tiny_config), "--backend", backends, "--repeats", "2",
                 "--points", "4", "--samples", "128", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert {"cpu", "cpu_flags", "commit", "date"} <= set(env)
    rows = doc["margin_rows"]
    assert {r["backend"] for r in rows} == set(backends.split(","))
    assert all(r["environment"] == env for r in rows + doc["standard_median_rows"])
    regs = get_registries()  # the standard workload runs each backend in its default precision, as margins do
    assert all(r["precision"] == regs.backends.get(r["backend"]).precisions[0] for r in doc["standard_median_rows"])
    assert len({json.dumps(r["margins"]) for r in rows}) == 1  # identical margins, every backend and repeat
    assert all(0 < r["peak_fraction"] for r in rows)
    assert "beta_vae(beta=1.0) / torch" in doc["summary"]


def test_measured_peak_is_a_large_product_and_percent_uses_executed_work():
    assert bench.measure_peak(torch.float32, n=256, seconds=0.05) > 0
    row = bench.run_case(bench.StandardDecoderVAE(), "std", "torch", "fp32", 2, 16, 4.0)
    assert row.executed_gflops == pytest.approx(row.gflops)  # torch screens nothing
    assert len(row.counts_sha1) == 40


def test_percent_peak_counts_each_precision_at_its_own_peak():
    """Mixed runs: bf16 last layers at the bf16 peak, the rest (hidden layers, fp32 rechecks) at the fp32 peak;
    a pure fp32 run is its rate over the fp32 peak; without the needed peak there is no figure."""
    peaks = {"fp32": 100.0, "bf16": 400.0}
    row = margin_bench.MarginRow("m", "cpp", 0, 1, 2.0, 0.5, 1.0, 0.5, 1.0, 10, 1, "bf16", 0.0, 10.0, 10.0, None,
                                 None, bf16_gflop=8.0)
    assert margin_bench.peak_fraction(row, peaks) == pytest.approx(2 / 100 + 8 / 400)
    assert margin_bench.peak_fraction(row, {"fp32": 100.0}) is None
    row.bf16_gflop = 0.0
    assert margin_bench.peak_fraction(row, peaks) == pytest.approx(10 / 100)
    std = bench.BenchRow("std", "cpp", "bf16", 1, 1, 1, 0.5, 2.0, 6.0, 12.0, None, None, 0.0, 0.1,
                         executed_gflops=10.0, bf16_gflop=4.0)
    assert bench.row_peak_fraction(std, peaks) == pytest.approx((1 / 100 + 4 / 400) / 0.5)


def test_margin_table_says_the_screened_share_depends_on_the_call_history():
    """Review s10-ra: with screen="auto" (CppBackend's default since session 10) the "screened" column depends on
    the calls before on the same model (warm-up, earlier repetitions): the rendered table says so."""
    from rich.console import Console

    row = margin_bench.MarginRow("m", "cpp", 0, 2, 1.0, 0.5, 0.3, 0.2, 100.0, 200, 3, "bf16", 0.01, 1.0, 3.0,
                                 10.0, 0.3)
    console = Console(width=400, record=True)
    console.print(margin_bench.render([row], {"bf16": 10.0}, 1))
    text = " ".join(console.export_text().split())
    assert "depends on the earlier calls on the same model" in text and "counts do not" in text
