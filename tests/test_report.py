"""The report, its figures and the claims, built from a synthetic results database (no training).

The synthetic runs are made so that every claim's answer is known: R, sigma and the likelihood under
attack grow with beta, ||J_mu||_F shrinks with beta, mu-attacks do more damage than sigma-attacks, the
bound is a noisy 0.8 * R; but R *shrinks* with tau, so that claim must come out "not supported".
"""
from __future__ import annotations

import math
import os
import random
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch

from robbench.paper import claims as claims_mod
from robbench.paper import figures
from robbench.paper.report import (REPORT_DIR, likelihood_curves_data, load_runs, recon_examples, reference_radius,
                             likelihood_levels, write_report)
from robbench.store import RunRecord, ResultRow, ResultStore

BETAS = (0.1, 1.0, 10.0)
TAUS = (0.0, 0.5, 1.0)
SEEDS = (0, 1)
POINTS = tuple(range(8))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



def _record_run(store, config, jobs):
    """The report reads each run's config and job keys; models and points are not needed here."""
    store.record_run(RunRecord(config, jobs, [], []))

def _margin(beta: float, seed: int, point: int) -> float:
    # grows with beta, with a point/seed wiggle far smaller than the gaps between configurations
    return 0.5 + 0.4 * math.log10(beta * 10) + 0.01 * point + 0.005 * seed


def _rows_beta(rng: random.Random) -> tuple[list[ResultRow], dict]:
    rows = []
    lik_jobs = {1.0: [], 2.0: []}
    for beta in BETAS:
        label = f"beta_vae(beta={beta})"
        for seed in SEEDS:
            for p in POINTS:
                r = _margin(beta, seed, p)
                rows.append(ResultRow(f"m-{beta}-{seed}", p, label, seed, "max_damage", "margin", "ok",
                                      {"margin": r, "margin_lo": r - 0.05, "margin_hi": r + 0.05, "undecided": False,
                                       "samples": 512}, None, 0.1))
                vacuous = beta == 0.1 and p == 0 and seed == 0
                rows.append(ResultRow(f"b-{beta}-{seed}", p, label, seed, "", "bound", "ok",
                                      {"bound": None if vacuous else 0.8 * r + rng.uniform(-0.02, 0.02),
                                       "bound_status": "vacuous" if vacuous else "ok", "p0_lo": 0.9,
                                       "min_sigma": 0.1 * beta ** 0.5, "mean_sigma": 0.2 * beta ** 0.5 + 0.001 * p,
                                       "jacobian_frobenius": 5.0 / beta ** 0.5 + 0.01 * p}, None, 0.1))
                grid = [0.5 * k for k in range(11)]
                p_curve = [1.0 / (1.0 + math.exp(4.0 * (t - r))) for t in grid]
                rows.append(ResultRow(f"s-{beta}-{seed}", p, label, seed, "max_damage", "sweep", "ok",
                                      {"sweep_norms": grid, "sweep_p": p_curve,
                                       "sweep_p_lo": [max(0.0, v - 0.05) for v in p_curve],
                                       "sweep_p_hi": [min(1.0, v + 0.05) for v in p_curve],
                                       "sweep_crossing": r, "damage": 1.0}, None, 0.1))
                for radius, key in ((1.0, f"l1-{beta}-{seed}"), (2.0, f"l2-{beta}-{seed}")):
                    clean = -100.0
                    attacked = clean - 30.0 * radius / beta ** 0.5 - 0.1 * p
                    rows.append(ResultRow(key, p, label, seed, "max_damage", "likelihood", "ok",
                                          {"loglik_clean": clean, "loglik_attack": attacked,
                                           "loglik_noise": clean - 5.0 * radius,
                                           "degradation_attack": abs(attacked - clean) / abs(clean),
                                           "degradation_noise": 5.0 * radius / 100.0, "damage": 2.0}, None, 0.1))
                    lik_jobs[radius].append(key)
    return rows, lik_jobs


def _rows_tau() -> list[ResultRow]:
    rows = []
    for tau in TAUS:
        for p in POINTS:
            r = 2.0 - tau + 0.01 * p  # shrinks with tau: the claim must not be supported
            rows.append(ResultRow(f"t-{tau}", p, f"sigma_offset_vae(tau={tau})", 0, "max_damage", "margin", "ok",
                                  {"margin": r, "margin_lo": r - 0.1, "margin_hi": r + 0.1}, None, 0.1))
    return rows


def _rows_routes() -> list[ResultRow]:
    rows = []
    for beta in BETAS:
        for route, scale in (("mu", 3.0), ("sigma", 0.5), ("both", 3.2)):
            for p in POINTS:
                rows.append(ResultRow(f"d-{beta}-{route}", p, f"beta_vae(beta={beta})", 0,
                                      f"max_damage(route={route})", "damage", "ok",
                                      {"damage": scale + 0.1 * p}, None, 0.1))
    return rows


def _rows_certified() -> list[ResultRow]:
    """certified + margin for one model (no bound rows: they would enter the Theorem 1 claim's numbers)."""
    rows = []
    for p in POINTS:
        r = 1.0 + 0.1 * p
        rows.append(ResultRow("c-m", p, "lipschitz_vae", 0, "max_damage", "margin", "ok",
                              {"margin": r, "margin_lo": r - 0.05, "margin_hi": r + 0.05}, None, 0.1))
        rows.append(ResultRow("c-c", p, "lipschitz_vae", 0, "", "certified", "ok",
                              {"r_cert": 0.6 * r, "r_cert_status": "ok", "r_cert_method": "lipschitz"}, None, 0.1))
    return rows


def _config(**over) -> dict:
    cfg = {"models": ["beta_vae"], "attacks": ["max_damage"], "estimators": ["margin"], "points": len(POINTS),
           "model_seeds": list(SEEDS), "r": 4.0, "m": 0.5, "train": {"epochs": 1}, "estimator_params": {}}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two run directories under one root (beta sweep + likelihood at two radii; tau; routes)."""
    root = tmp_path_factory.mktemp("runs")
    rng = random.Random(0)
    beta_rows, lik_jobs = _rows_beta(rng)
    store = ResultStore(root / "beta")
    store.write(beta_rows)
    plain = sorted({r.job_key for r in beta_rows if r.estimator != "likelihood"})
    _record_run(store, _config(estimators=["margin", "bound", "sweep"]), plain)
    for radius in (1.0, 2.0):
        _record_run(store, _config(estimators=["likelihood"],
                                 estimator_params={"likelihood": {"radius": radius, "noise_sigma": radius / 10}}),
                         sorted(set(lik_jobs[radius])))
    store.record_model("k0", "beta_vae(beta=1.0)", 0, {"test_elbo": -120.0})
    store.close()
    # arrays for the first margin job of each beta: x, an attacked x, a reconstruction
    for beta in BETAS:
        folder = root / "beta" / "arrays" / f"m-{beta}-0"
        folder.mkdir(parents=True)
        for p in POINTS[:3]:
            x = torch.zeros(1, 28, 28)
            x[0, 8:20, 12:16] = 1.0
            delta = torch.full_like(x, 0.01 * (p + 1))
            torch.save({"x": x, "x_adv": (x + delta).clamp(0, 1), "recon_adv": x * 0.8}, folder / f"{p}.pt")
    store = ResultStore(root / "tau")
    store.write(_rows_tau())
    _record_run(store, _config(models=["sigma_offset_vae"]), [f"t-{t}" for t in TAUS])
    store.close()
    store = ResultStore(root / "certified")
    store.write(_rows_certified())
    _record_run(store, _config(models=["lipschitz_vae"], estimators=["margin", "certified"]), ["c-m", "c-c"])
    store.close()
    store = ResultStore(root / "routes")
    store.write(_rows_routes())
    _record_run(store, _config(estimators=["damage"]), sorted({r.job_key for r in _rows_routes()}))
    store.close()
    return root


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_builds_all_figures_and_fills_claims_from_data(runs: Path) -> None:
    md = write_report(runs)
    assert md == runs / REPORT_DIR / "report.md"
    text = md.read_text()
    pngs = sorted((runs / REPORT_DIR).glob("*.png"))
    assert [p.stem for p in pngs] == sorted(
        ["certified_sandwich", "fig1_8_reconstructions", "fig4_damage_by_route", "fig5_7left_sweep", "fig6abc_bound_vs_margin",
         "fig6def_degradation_vs_margin", "fig7_9b_likelihood", "fig9acd_distributions"])
    for png in pngs:
        w, h = _png_size(png)
        assert w > 200 and h > 150
        assert f"({png.name})" in text  # linked from the markdown
    assert "Not produced" not in text
    html = (runs / REPORT_DIR / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)  # self-contained
    # the claims table holds the numbers computed from the rows
    mean_r_01 = sum(_margin(0.1, s, p) for s in SEEDS for p in POINTS) / (len(SEEDS) * len(POINTS))
    assert f"beta=0.1: {mean_r_01:.3g} [" in text and "trend test over 6 trained networks" in text
    for statement, verdict in (("R grows with β", "supported"), ("grows with the σ offset τ", "not supported")):
        line = next(ln for ln in text.splitlines() if statement in ln)
        assert f"| {verdict} |" in line


def test_claim_verdicts_and_numbers(runs: Path) -> None:
    data = load_runs(runs)
    from robbench.paper.report import claim_rows
    result = {c.key: c for c in claims_mod.check_claims(claim_rows(data))}
    assert {k: c.verdict for k, c in result.items()} == {
        "R_beta": "supported", "R_tau": "not supported", "R_tau_paired": "not tested in this run",
        "sweep_noise_tau": "not tested in this run", "sigma_beta": "supported", "jacobian_beta": "supported",
        "routes": "supported", "bound": "supported", "loglik_beta": "supported"}
    # R vs beta: per-configuration means are the exact means of the stored margins
    table = result["R_beta"].table
    for row, beta in zip(table, BETAS):
        expected = sum(_margin(beta, s, p) for s in SEEDS for p in POINTS) / 16
        assert row["mean"] == pytest.approx(expected, abs=1e-12)
        assert row["n"] == 16 and row["lo"] < row["mean"] < row["hi"]
    # routes: mu 3.0 + 0.1 p against sigma 0.5 + 0.1 p -> paired difference exactly 2.5, zero-width interval
    for row in result["routes"].table:
        assert row["diff"] == pytest.approx(2.5) and row["mu"] == pytest.approx(3.35)
        assert row["both"] == pytest.approx(3.55) and row["estimator"] == "damage"
    # bound: 47 non-vacuous pairs (one vacuous), strong correlation
    assert "n=47" in result["bound"].evidence and "1 vacuous" in result["bound"].evidence
    # likelihood claim reads only the largest attack radius (2.0): 16 points per beta, not 32
    assert [row["n"] for row in result["loglik_beta"].table] == [16, 16, 16]
    assert result["loglik_beta"].table[0]["mean"] == pytest.approx(-100 - 60 / 0.1 ** 0.5 - 0.35)


def _net_rows(label: str, level_means: dict[int, float], points: int = 25) -> list[ResultRow]:
    return [ResultRow(f"{label}-{seed}", p, label, seed, "max_damage", "margin", "ok",
                      {"margin": mean + 0.001 * p}, None, 0.1)
            for seed, mean in level_means.items() for p in range(points)]


def test_trend_claim_takes_the_network_as_the_unit() -> None:
    """Means that rise with beta across 2 x 25 points per configuration but wobble from seed to seed:
    over 150 'independent' points the trend looks certain; over 6 networks it is not significant."""
    rows = (_net_rows("beta_vae(beta=0.1)", {0: 1.0, 1: 1.5}) + _net_rows("beta_vae(beta=1.0)", {0: 1.1, 1: 1.6})
            + _net_rows("beta_vae(beta=10.0)", {0: 1.2, 1: 1.7}))
    claim = next(c for c in claims_mod.check_claims(rows) if c.key == "R_beta")
    assert claim.verdict == "partly supported", claim.evidence
    assert "over 6 trained networks" in claim.evidence
    assert all(row["networks"] == 2 and row["ci_unit"] == "seed" for row in claim.table)
    from scipy import stats as sps
    xs = [b for b in (0.1, 1.0, 10.0) for _ in range(50)]
    ys = [r.metrics["margin"] for r in rows]
    assert sps.spearmanr(xs, ys).pvalue < 0.05  # what counting points as independent would have said


def test_identical_configurations_count_once_in_pooled_statistics() -> None:
    rows = []
    for label in ("beta_vae(beta=1.0)", "sigma_offset_vae(tau=0.0)"):  # the same networks, same numbers
        for p in range(6):
            rows.append(ResultRow(f"m-{label}", p, label, 0, "max_damage", "margin", "ok", {"margin": 1.0 + p}, None, 0))
            rows.append(ResultRow(f"b-{label}", p, label, 0, "", "bound", "ok", {"bound": 0.5 + 0.3 * p}, None, 0))
    claim = next(c for c in claims_mod.check_claims(rows) if c.key == "bound")
    assert "n=6" in claim.evidence and [t["config"] for t in claim.table] == ["beta_vae(beta=1.0)"]


def _encoder_stats_run(folder: Path) -> None:
    """A run directory holding 4 encoder_stats rows of one VAE (one figure's data, no claim's)."""
    store = ResultStore(folder)
    store.write([ResultRow("e", p, "vae", 0, "", "encoder_stats", "ok",
                           {"min_sigma": 0.1, "mean_sigma": 0.2 + 0.01 * p, "jacobian_frobenius": 3.0}, None, 0.1)
                 for p in range(4)])
    _record_run(store, _config(models=["vae"], estimators=["encoder_stats"]), ["e"])
    store.close()


def test_claims_not_tested_and_figures_skipped_without_data(tmp_path: Path) -> None:
    _encoder_stats_run(tmp_path)
    text = write_report(tmp_path).read_text()
    verdicts = {c.key: c.verdict for c in claims_mod.check_claims(load_runs(tmp_path).rows)}
    assert set(verdicts.values()) == {"not tested in this run"}
    assert text.count("not tested in this run") == len(verdicts)
    assert [p.stem for p in (tmp_path / REPORT_DIR).glob("*.png")] == ["fig9acd_distributions"]
    assert "Not produced: this run has no data for it. It needs estimator sweep" in text
    assert text.count("Not produced") == 7  # every figure but fig9acd (incl. the certified sandwich)


def test_likelihood_levels_come_from_each_jobs_config(runs: Path) -> None:
    data = load_runs(runs)
    levels = likelihood_levels(data)["beta_vae(beta=1.0)"]
    assert sorted(levels) == [1.0, 2.0]
    assert reference_radius(levels, 1.0) == 1.0 and reference_radius(levels, 1.7) == 2.0
    noise, attack, n_levels = likelihood_curves_data(data)
    assert n_levels == 2
    lv = {x.level: x.values for x in attack["beta_vae"]["beta_vae(beta=10.0)"]}
    assert sorted(lv) == [1.0, 2.0] and len(lv[2.0]) == 16
    assert sorted(x.level for x in noise["beta_vae"]["beta_vae(beta=10.0)"]) == [0.1, 0.2]


def test_recon_examples_read_stored_arrays(runs: Path) -> None:
    examples = recon_examples(load_runs(runs))
    assert list(examples) == [f"beta_vae(beta={b})" for b in BETAS]
    ex = examples["beta_vae(beta=1.0)"]
    assert len(ex) == 3
    # ||delta|| of point 1 = 0.02 on the 28*28 - 48 pixels that are not already at 1
    assert ex[1].note.startswith(f"‖δ‖={0.02 * math.sqrt(28 * 28 - 48):.2f}")
    assert f"R={_margin(1.0, 0, 1):.2f}" in ex[1].note


def test_parse_label_and_route() -> None:
    assert claims_mod.parse_label("beta_vae(beta=1.0)") == ("beta_vae", {"beta": 1.0})
    assert claims_mod.parse_label("vae") == ("vae", {})
    assert claims_mod.parse_label("x(a=1, b=relu)") == ("x", {"a": 1.0, "b": "relu"})
    assert claims_mod.attack_route("max_damage") == "both"
    assert claims_mod.attack_route("max_damage(route=sigma)") == "sigma"
    assert claims_mod.attack_route("latent") is None


def test_as_image_shapes() -> None:
    assert figures.as_image(torch.rand(1, 28, 28).numpy()).shape == (28, 28)
    assert figures.as_image(torch.rand(784).numpy()).shape == (28, 28)
    assert figures.as_image(torch.rand(3, 32, 32).numpy()).shape == (32, 32, 3)
    assert figures.as_image(torch.full((4,), 2.0).numpy()).max() == 1.0


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.sqlite"):
        write_report(tmp_path)


# --- the reproduce command's ready configs ---------------------------------------------------------
def test_ready_configs_validate_against_the_plugins() -> None:
    from robbench.config import build_config, model_configs, validate_against_plugins
    from robbench.plugins import get_registries
    from robbench.paper.reproduce import EXPERIMENTS, LIKELIHOOD_LEVELS, experiments

    regs = get_registries()
    for quick in (False, True):
        exps = {e.name: e for e in experiments(quick=quick, data_dir="/data/mnist")}
        assert tuple(exps) == EXPERIMENTS
        for exp in exps.values():
            for values in exp.configs:
                cfg = build_config(values)
                validate_against_plugins(cfg, regs)
                assert cfg.data_dir == "/data/mnist" and cfg.dataset == "mnist_full" and cfg.r == 4.0 and cfg.m == 0.5
                assert cfg.points == (8 if quick else 25) and len(cfg.model_seeds) == (1 if quick else 5)
        labels = {m.label for m in model_configs(build_config(exps["beta"].configs[0]), regs)}
        assert labels == {"beta_vae(beta=0.1)", "beta_vae(beta=1.0)", "beta_vae(beta=10.0)"}
        labels = {m.label for m in model_configs(build_config(exps["tau"].configs[0]), regs)}
        assert labels == {f"sigma_offset_vae(tau={t})" for t in (0.0, 0.1, 0.5, 1.0)}
        assert exps["routes"].configs[0]["attack_params"]["max_damage"]["route"] == ["mu", "sigma", "both"]
        # retest: the same points and networks as beta / tau (tau > 0), other streams, margin and bound only,
        # with the same margin settings as the runs it re-measures
        for values, base in zip(exps["retest"].configs, ("beta", "tau")):
            cfg, orig = build_config(values), build_config(exps[base].configs[0])
            assert (cfg.seed, cfg.points_seed(), orig.points_seed()) == (1, 0, 0)
            assert cfg.estimators == ["margin", "bound"]
            assert cfg.estimator_params["margin"] == orig.estimator_params["margin"] and cfg.train == orig.train
        assert exps["retest"].configs[1]["model_params"]["sigma_offset_vae"]["tau"] == [0.1, 0.5, 1.0]
        assert build_config(exps["tau_long"].configs[0]).train.patience == 5
        assert exps["tau_noise"].configs[0]["attacks"] == ["noise"]
    full = {e.name: e for e in experiments()}
    levels = [c["estimator_params"]["likelihood"] for c in full["likelihood"].configs]
    assert [(lv["radius"], lv["noise_sigma"]) for lv in levels] == list(LIKELIHOOD_LEVELS)
    # quick overrides touch only the estimators an experiment uses
    quick = {e.name: e for e in experiments(quick=True)}
    assert quick["beta"].configs[0]["estimator_params"]["margin"]["samples_max"] == 1024
    assert "margin" not in (quick["routes"].configs[0].get("estimator_params") or {})


def test_reproduce_rejects_unknown_experiment(tmp_path: Path) -> None:
    import argparse

    from robbench.config import ConfigError
    from robbench.paper.reproduce import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--only", "beta,gamma"])
    with pytest.raises(ConfigError, match="gamma"):
        run(args)


@pytest.mark.parametrize("flags, message", [(["--only", "beta", "--backend", "nope"], "bad value for 'backend': 'nope'"),
                                           (["--only", ""], "bad value for --only: ''"),
                                           (["--only", " , "], "bad value for --only")])
def test_reproduce_refuses_a_bad_flag_before_any_experiment(tmp_path: Path, capsys, flags, message) -> None:
    """`reproduce --backend nope` skipped every experiment as if a plugin were missing ("skipping
    experiment beta: ...; no experiment ran", exit 1); `--only ''` ran all seven experiments."""
    from robbench import cli

    out = tmp_path / "out"
    assert cli.main(["reproduce", "--quick", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_end_to_end_with_real_estimators(tmp_path: Path) -> None:
    """A real (tiny) run through the runner and the built-in estimators, then the report: the keys the
    estimators write are the keys the report reads. The analytic model needs no training."""
    from rich.console import Console

    from robbench.config import build_config, validate_against_plugins
    from robbench.plugins import get_registries
    from robbench.runner import Runner

    regs = get_registries()
    cfg = build_config({
        "models": ["linear_gaussian"], "attacks": ["max_damage"], "points": 3,
        "estimators": ["margin", "bound", "encoder_stats", "sweep", "likelihood"],
        "attack_params": {"max_damage": {"steps": 5, "eta_samples": 2}},
        "estimator_params": {"margin": {"tolerance": 0.2, "samples_max": 256, "samples_initial": 64},
                             "bound": {"p0_samples": 256},
                             "sweep": {"grid_points": 6, "samples": 64}}})
    validate_against_plugins(cfg, regs)
    Runner(cfg, regs, tmp_path / "run", console=Console(quiet=True), progress=False).run().close()
    text = write_report(tmp_path).read_text()
    drawn = {p.stem for p in (tmp_path / REPORT_DIR).glob("*.png")}
    assert {"fig5_7left_sweep", "fig6abc_bound_vs_margin", "fig6def_degradation_vs_margin",
            "fig7_9b_likelihood", "fig9acd_distributions"} <= drawn
    for png in drawn:
        _png_size(tmp_path / REPORT_DIR / f"{png}.png")
    assert "| linear_gaussian | max_damage |" in text  # the leaderboard


def test_claims_read_family_and_parameters_from_the_store_not_the_label():
    from robbench.paper.claims import model_info
    from robbench.store import ResultRow

    new = ResultRow("k", 0, "my label", 0, "", "encoder_stats", "ok", {}, None, 0.1, "beta_vae", {"beta": 2})
    old = ResultRow("j", 0, "beta_vae(beta=1.0)", 0, "", "encoder_stats", "ok", {}, None, 0.1)
    assert model_info([new, old]) == {"my label": ("beta_vae", {"beta": 2.0}),
                                      "beta_vae(beta=1.0)": ("beta_vae", {"beta": 1.0})}


def test_a_report_write_that_fails_half_way_keeps_the_previous_report_whole(tmp_path: Path, monkeypatch) -> None:
    """Disk full while report.md is written: the previous report.md, report.html and figures stay as they
    were, every figure report.md links exists, and no temporary is left (before: report.md was cut short,
    the old PNGs deleted first)."""
    import errno

    _encoder_stats_run(tmp_path)
    write_report(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / REPORT_DIR).iterdir()}
    assert "report.md" in before and any(name.endswith(".png") for name in before)
    entries = sorted(p.name for p in tmp_path.iterdir())
    real_write_text = Path.write_text

    def full_disk(path: Path, text: str, *args, **kwargs) -> int:
        if path.name.startswith("report.md"):  # also a temporary named after it
            real_write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_report(tmp_path)
    after = {p.name: p.read_bytes() for p in (tmp_path / REPORT_DIR).iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # no staging folder left behind


def test_a_report_folder_linked_to_another_file_system_is_written(tmp_path: Path) -> None:
    """report/ may be a link to a folder elsewhere (a web server's, on another file system): the report is
    staged inside it, so its files are renamed within one file system (before: staging beside report/ in
    the run directory, os.replace failed with EXDEV 'Invalid cross-device link')."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's temporary folder")
    target = Path(tempfile.mkdtemp(dir=shm))
    try:
        _encoder_stats_run(tmp_path)
        (tmp_path / REPORT_DIR).symlink_to(target)
        write_report(tmp_path)
        assert {p.name for p in target.iterdir()} == {"report.md", "report.html", "fig9acd_distributions.png"}
        assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_DIR, "results.sqlite"]
    finally:
        shutil.rmtree(target)


def test_a_report_path_that_is_a_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    """RUN/report is a file: exit 2 naming it (before: a FileExistsError traceback)."""
    from robbench import cli

    _encoder_stats_run(tmp_path)
    (tmp_path / REPORT_DIR).write_text("mine")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err, err
    assert (tmp_path / REPORT_DIR).read_text() == "mine"


def test_a_killed_reports_staging_folder_is_removed_by_the_next_report(tmp_path: Path) -> None:
    """A report killed half-way leaves report/.staging-<pid>-*: the next report removes it when that pid is
    gone, and keeps one whose writer still runs (before: such folders stayed for ever)."""
    from robbench.paper.report import STAGING_PREFIX

    _encoder_stats_run(tmp_path)
    out = tmp_path / REPORT_DIR
    dead = out / f"{STAGING_PREFIX}999999999-abc"  # beyond any pid: no such process
    dead.mkdir(parents=True)
    (dead / "report.md").write_text("half")
    live = out / f"{STAGING_PREFIX}1-def"  # pid 1 always runs
    live.mkdir()
    write_report(tmp_path)
    assert not dead.exists()
    assert live.is_dir()
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "fig9acd_distributions.png", live.name}


def test_the_report_shows_each_invocations_provenance_and_the_rows_it_wrote(tmp_path: Path) -> None:
    """A reader of the report must see what produced its numbers: versions, commit, threads, backend and
    seeds, per invocation (a resumed run may mix invocations). Before, the report showed none of it."""
    from rich.console import Console

    from robbench.config import build_config, validate_against_plugins
    from robbench.plugins import get_registries
    from robbench.provenance import git_commit
    from robbench.runner import Runner

    regs = get_registries()
    for points, seed in ((2, 5), (4, 5)):  # the second invocation resumes: 2 new points
        cfg = build_config({"models": ["linear_gaussian"], "estimators": ["encoder_stats"], "points": points,
                            "seed": seed, "point_seed": 11, "backend": "torch"})
        validate_against_plugins(cfg, regs)
        Runner(cfg, regs, tmp_path / "run", console=Console(quiet=True), progress=False).run().close()
    text = write_report(tmp_path / "run").read_text()
    table = [line for line in text.splitlines() if line.startswith(f"| {tmp_path / 'run'} | 20")]
    assert len(table) == 2, text[:3000]
    assert [line.split(" | ")[-1] for line in table] == ["2 |", "2 |"]  # rows written by each invocation
    for line in table:
        # backend torch asked for; encoder_stats ran neither an attack nor Monte Carlo ("—; —")
        assert f"| {torch.__version__} |" in line and "| torch | —; — | 5, 11 |" in line
        commit = git_commit()
        if commit:
            assert commit["commit"][:12] in line


def test_a_later_invocation_with_other_settings_supersedes_the_same_points_in_the_report(tmp_path: Path) -> None:
    """One run directory, the same model and points run at r = 4, then at r = 3 (a new job key). The report
    merged both: per point the row read last won, so its leaderboard's mean R mixed margins of two r (seen:
    beta = 10, 8 points at r = 4 then 4 at r = 3 gave mean R 2.411 over "8 points", leaderboard.md 1.733 over
    4). Now the job the latest invocation listed supersedes the other jobs of the same model, estimator,
    attack, estimator parameters and run seed in that directory (other run settings or algorithm version),
    and the report says so; other estimator parameters (likelihood levels) and run seeds (retests) stay."""
    def job(key, r, seed=0, params=None):
        store.record_jobs([(key, "min_r", params or {"samples": 64},
                            {"r": r, "m": 0.5, "confidence": 0.95, "backend": "torch", "seed": seed})])

    store = ResultStore(tmp_path)
    job("a4", 4.0)
    store.write([ResultRow("a4", p, "vae", 0, "", "min_r", "ok", {"min_r": 10.0 + p}, None, 0.1) for p in range(4)])
    _record_run(store, _config(models=["vae"], estimators=["min_r"], r=4.0), ["a4"])
    job("a3", 3.0)
    store.write([ResultRow("a3", p, "vae", 0, "", "min_r", "ok", {"min_r": 1.0 + p}, None, 0.1) for p in range(2)])
    _record_run(store, _config(models=["vae"], estimators=["min_r"], r=3.0), ["a3"])
    job("b3", 3.0, params={"samples": 128})  # other estimator parameters: kept
    store.write([ResultRow("b3", 0, "vae", 0, "", "min_r", "ok", {"min_r": 5.0}, None, 0.1)])
    _record_run(store, _config(models=["vae"], estimators=["min_r"], r=3.0), ["b3"])
    store.close()
    data = load_runs(tmp_path)
    kept = sorted((r.job_key, r.point_id) for r in data.rows)
    assert kept == [("a3", 0), ("a3", 1), ("b3", 0)]  # a4's points 2 and 3 too: r = 4, not the latest r
    text = write_report(tmp_path).read_text()
    assert "4 stored rows were superseded" in text
