"""benchmarks/gpu_check.py, the prepared device check, at a tiny size on the CPU (``--device cpu`` checks the
``cpp`` backend against ``torch``): every phase runs and is recorded, the compiled MLP path's decisions equal
the reference's sample by sample, a backend that decides differently is caught, and the verdict follows the
rule it states. No timing is asserted."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from robbench import kernels

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not kernels.compiler_available(), reason="no C++ compiler/ninja: cpp backend skipped")
def test_cpu_quick_run_records_every_phase_and_a_verdict(gpu_check, tmp_path, capsys, one_thread):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["format"] == "robbench-gpu-check/1" and doc["compiled_backend"] == "cpp"
    env = doc["environment"]
    assert env["torch"] and env["date"] and len(env["source_digest"]) == 16 and env["device"] == "cpu"
    assert env["source_digest"] == gpu_check.source_digest()
    phases = doc["phases"]
    assert set(phases) == {"build", "validate", "standard", "margin"}
    assert all("error" not in ph for ph in phases.values()), {k: v.get("error") for k, v in phases.items()}
    val = phases["validate"]
    assert val["normals_bit_exact"] and val["decisions_checked"] > 0
    mlp = [c for c in val["cases"] if not c["decoder"].startswith("generic")]
    assert len(mlp) == 4
    for case in mlp:  # the fused MLP path reproduces the reference's every decision, ties included
        assert case["ok"], case["decoder"]
        assert case["sq_distances"]["bit_identical"] == case["sq_distances"]["samples"]
        assert {r["mode"] for r in case["per_sample"]} == {"fp32", "fp32+screen", "bf16", "bf16+screen"}
        assert any(r["radius"] == "own x (1+0)" for r in case["per_sample"])
    std = phases["standard"]["rows"]
    assert {(r["S"], r["radius"]) for r in std} == {(64, "median"), (64, 4.0)}
    assert all(r["ratio"] > 0 and set(r["seconds"]) == {"torch", "cpp"} for r in std)
    margin = phases["margin"]
    assert margin["identical_margins"] and {r["backend"] for r in margin["rows"]} == {"torch", "cpp"}
    v = doc["verdict"]
    assert v["auto_may_pick"] == (v["validated"] and v["faster"])
    assert v["validated"] == val["ok"] and "issue14_target_3x" not in v
    out = capsys.readouterr().out
    assert "auto may pick cpp:" in out and doc["summary"][-1] in out


def test_validation_catches_a_backend_that_decides_differently(gpu_check, miscounting_backend, one_thread):
    res = gpu_check.validate(gpu_check.torch.device("cpu"), miscounting_backend, per_sample=16, points=2, samples=32)
    assert not res["ok"] and all(not c["ok"] for c in res["cases"])
    # at a radius beyond every sample all 16 one-sample points are inside: each count is one short
    far = [r for c in res["cases"] for r in c["per_sample"] if r["radius"] == "own x (1+0.6)"]
    assert far and all(r["mismatches"] == 16 for r in far)


def _doc(compiled: str, validated: bool, std_ratio: float, mc_ratio: float) -> dict:
    return {"compiled_backend": compiled, "phases": {
        "validate": {"ok": validated},
        "standard": {"rows": [{"S": 1024, "radius": "median", "ratio": std_ratio}]},
        "margin": {"summary": {"m / torch": {}, f"m / {compiled}": {"montecarlo_ratio": mc_ratio,
                                                                     "whole_ratio": 1.0}}}}}


@pytest.mark.parametrize("validated, std_ratio, mc_ratio, pick", [
    (True, 1.5, 1.2, True), (True, 1.5, 0.9, False), (True, 0.8, 1.2, False), (False, 4.0, 4.0, False)])
def test_verdict_needs_validation_and_every_monte_carlo_ratio_above_one(gpu_check, validated, std_ratio,
                                                                       mc_ratio, pick):
    v = gpu_check.verdict(_doc("cpp", validated, std_ratio, mc_ratio))
    assert v["auto_may_pick"] is pick and v["validated"] is validated
    assert bool(v["reasons"]) is (not pick)


def test_verdict_on_cuda_states_the_issue_target(gpu_check):
    v = gpu_check.verdict(_doc("cuda", True, 3.5, 2.5))
    assert v["auto_may_pick"] and v["issue14_target_3x"] == {"met": False, "min_ratio": 2.5}
    failed = _doc("cuda", True, 3.5, 3.5)
    failed["phases"]["margin"] = {"ok": False, "identical_margins": False, "error": "AssertionError: margins differ"}
    v = gpu_check.verdict(failed)
    assert not v["auto_may_pick"] and not v["validated"] and any("margin phase failed" in r for r in v["reasons"])
