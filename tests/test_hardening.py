"""What an adversarial pass broke (issue 12), one test (or table of cases) per finding.

Plugins that break their contract, bad values, corrupt or foreign state and concurrent use must end in
a failed row with a clear error or in exit status 2 with a message, never in numbers or a traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from robbench import hookimpl, kernels, plugins
from robbench_plugins.analytic import LinearGaussianVAE
from robbench.checks import PluginOutputError, checked
from robbench.cli import main
from robbench.locks import FileLock
from robbench.protocols import AttackResult, ModelFamily, call_attack

# Small, fast settings shared by the end-to-end cases: an analytic model (no training) on 8x8 digits.
FAST = ["--dataset", "digits", "--models", "linear_gaussian", "--points", "3", "--no-progress", "--backend", "torch"]
MARGIN = ["--estimators", "margin", "--param", "margin.samples_initial=64", "--param", "margin.samples_max=256",
          "--param", "margin.tolerance=0.5", "--param", "margin.max_radius=4.0",
          "--param", "margin.keep_adversarial=false"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def plugin():
    """Register throwaway plugin objects for one test."""
    added = []

    def add(obj):
        plugins.register_plugin(obj)
        added.append(obj)

    yield add
    for obj in added:
        plugins.unregister_plugin(obj)


def _rows(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        return db.execute("SELECT job_key, point_id, status, metrics, error FROM results ORDER BY job_key, point_id"
                          ).fetchall()


# --- 1. stale extension-build lock -----------------------------------------------------------------
_HOLD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from robbench.locks import FileLock
    build = Path(sys.argv[1]); build.mkdir(parents=True, exist_ok=True)
    lock = FileLock(build.parent / (build.name + ".build.lock")); assert lock.try_acquire()
    (build / "lock").touch()          # what torch's own FileBaton leaves while it compiles
    print("held", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)  # killed by the test
""")


@pytest.mark.parametrize("left_by", ["killed-build", "torch-lock-only"])
def test_stale_build_lock_is_cleared_with_a_message(tmp_path, capsys, left_by):
    build = tmp_path / "ext" / "robbench_ops"
    if left_by == "killed-build":
        done = subprocess.run([sys.executable, "-c", _HOLD, str(build), "kill"], capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL and "held" in done.stdout
    else:
        build.mkdir(parents=True)
        (build / "lock").touch()
    with kernels.build_lock(build):
        assert not (build / "lock").exists()
    assert "removing the stale build lock" in capsys.readouterr().err
    assert not list(build.parent.glob("*.build.lock"))


def test_a_live_build_is_waited_for_then_torch_is_used(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("ROBBENCH_BUILD_WAIT", "0.5")
    monkeypatch.setattr(kernels, "_STATE", {"loaded": False, "error": None, "warned": False})
    monkeypatch.setattr(kernels, "compiler_available", lambda: True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "ext" / "robbench_ops"), "hold"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert kernels.load(warn=True) is False  # returns after the bounded wait, no hang
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"process {holder.pid}" in err and "waiting up to" in err
    assert "held the build lock" in err and "using the torch backend" in err


# --- 2. attack results are checked ---------------------------------------------------------------------
class BadAttack:
    description = "breaks the attack contract on purpose"
    defaults: dict = {}

    def __init__(self, kind: str):
        self.kind, self.name = kind, f"bad_{kind.replace('-', '_')}"

    def __call__(self, model, x, radius, *, params, generator, init=None, point_ids=None):
        r = radius.view(-1, *[1] * (x.dim() - 1)).to(x)
        unit = torch.ones_like(x) / x[0].numel() ** 0.5
        delta, damage = (x + r * unit).clamp(0, 1) - x, torch.zeros(x.shape[0])
        if self.kind == "norm":
            delta = 3 * r * unit
        elif self.kind == "norm-odd":  # breaks the contract on odd point ids only
            odd = (point_ids % 2 == 1).view(-1, *[1] * (x.dim() - 1)).to(x.device)
            delta = torch.where(odd, 3 * r * unit, delta)
        elif self.kind == "box":
            delta = torch.zeros_like(x)
            delta.view(x.shape[0], -1)[:, 0] = 0.75  # x = 0.3 in the test: 1.05 > 1, norm 0.75 <= radius 0.8
        elif self.kind == "nan":
            delta = delta.clone()
            delta.view(x.shape[0], -1)[0, 0] = float("nan")
        elif self.kind == "shape":
            delta = delta[..., :2]
        elif self.kind == "damage-shape":
            damage = damage[:, None]
        elif self.kind == "damage-inf":
            damage = damage + float("inf")
        elif self.kind == "not-a-result":
            return delta
        return AttackResult(delta, damage)


@pytest.mark.parametrize("kind, message", [
    ("norm", "exceeds the radius"),
    ("box", "leaves the input box [0, 1]"),
    ("nan", "delta is NaN or infinite"),
    ("shape", "delta has shape"),
    ("damage-shape", "damage has shape"),
    ("damage-inf", "damage is NaN or infinite"),
    ("not-a-result", "expected an AttackResult"),
])
def test_invalid_attack_results_are_rejected(kind, message):
    model = LinearGaussianVAE((1, 4, 4), 2)
    model.input_bounds = (0.0, 1.0)  # this test wants the pixel box
    x = torch.full((3, 1, 4, 4), 0.3)
    with pytest.raises(PluginOutputError, match="attack 'bad_.*' returned an invalid result") as err:
        call_attack(BadAttack(kind), model, x, torch.full((3,), 0.8), params={}, generator=torch.Generator(),
                    point_ids=torch.tensor([7, 8, 9]))
    assert message in str(err.value)


def test_results_on_the_boundary_pass_the_check():
    """delta of norm exactly the radius (after float32 rounding), x + delta on the box faces: accepted."""
    model = LinearGaussianVAE((1, 4, 4), 2)
    model.input_bounds = (0.0, 1.0)
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    direction = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    class Projected:
        name, description, defaults = "projected", "", {}

        def __call__(self, model, x, radius, *, params, generator, init=None):
            d = direction * (radius / direction.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
            return AttackResult((x + d).clamp(0, 1) - x, torch.zeros(x.shape[0]))

    call_attack(Projected(), model, x, torch.full((4,), 0.7), params={}, generator=torch.Generator())


def test_an_attack_that_overshoots_fails_its_rows_with_the_error(cache, tmp_path, plugin, capsys):
    class P:
        @hookimpl
        def register_attacks(self, register):
            register(BadAttack("norm"))

    plugin(P())
    out = tmp_path / "run"
    # The analytic model has no pixel box, so only the norm check can fire.
    assert main(["run", *FAST, "--attacks", "bad_norm", *MARGIN, "--out", str(out)]) == 0
    rows = _rows(out)
    assert rows and all(status == "error" and "exceeds the radius" in error for _, _, status, _, error in rows)
    board = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert board[0]["failed"] == 3 and "margin_mean" not in board[0]


def test_only_the_points_an_attack_breaks_on_fail(cache, tmp_path, plugin):
    class P:
        @hookimpl
        def register_attacks(self, register):
            register(BadAttack("norm-odd"))
            register(BadAttack("valid"))

    plugin(P())
    runs = {}
    for name in ("bad_norm_odd", "bad_valid"):
        out = tmp_path / name
        assert main(["run", *FAST, "--points", "6", "--attacks", name, *MARGIN, "--out", str(out)]) == 0
        runs[name] = {point: (status, metrics, error) for _, point, status, metrics, error in _rows(out)}
    broken, valid = runs["bad_norm_odd"], runs["bad_valid"]
    assert {p % 2 for p in broken} == {0, 1}
    for point, (status, metrics, error) in broken.items():
        if point % 2:
            assert status == "error" and "exceeds the radius" in error and f"points {point}" in error
        else:  # the same numbers as with an attack that never breaks: run alone, as in the batch
            assert status == "ok" and valid[point][0] == "ok"
            assert _without_attack_name(metrics) == _without_attack_name(valid[point][1])


def _without_attack_name(metrics: str) -> dict:
    """A row's metrics without ``margin_attack``, which names the attack that set the margin."""
    values = json.loads(metrics)
    values.pop("margin_attack", None)
    return values


# --- 3. NaN produced during estimation -------------------------------------------------------------------
class NanWhenPerturbed(LinearGaussianVAE):
    """Finite on the data set's 1/16 grid (clean 8x8 digits), NaN in mu anywhere else (perturbed inputs)."""

    def encode(self, x):
        mu, sigma = super().encode(x)
        off_grid = ((x * 16) - (x * 16).round()).abs().flatten(1).amax(1) > 1e-4
        return torch.where(off_grid[:, None], torch.full_like(mu, float("nan")), mu), sigma


class NanDecoder(LinearGaussianVAE):
    """NaN reconstructions for latents far from the origin (reached only by encoder noise samples)."""

    def decode(self, z):
        out = super().decode(z)
        return torch.where((z.norm(dim=1) > 2.5).view(-1, *[1] * (out.dim() - 1)), float("nan"), out)


@pytest.mark.parametrize("model_cls, where", [(NanWhenPerturbed, "encode(x) mu"), (NanDecoder, "decode(z)")])
def test_nan_during_estimation_fails_the_rows(cache, tmp_path, plugin, model_cls, where):
    plugin(type("P", (), {"register_models": hookimpl(lambda self, register: register(ModelFamily(
        "nan_model", "NaN off the clean inputs", lambda params, shape: model_cls(shape, 4, s=0.9), trainable=False)))})())
    out = tmp_path / "run"
    args = ["run", *FAST, "--models", "nan_model", "--attacks", "noise", *MARGIN, "--out", str(out)]
    assert main(args) == 0
    rows = _rows(out)
    assert len(rows) == 3
    assert all(status == "error" and f"NaN or infinity in {where}" in error for _, _, status, _, error in rows)


def test_the_api_raises_on_nan_from_perturbed_inputs():
    import robbench

    x = (torch.randint(0, 17, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 16.0)
    with pytest.raises(PluginOutputError, match="NaN or infinity in encode"):
        robbench.evaluate(NanWhenPerturbed((1, 8, 8), 4), x, attacks=["noise"], estimators=["probability"],
                          estimator_params={"probability": {"samples": 64}})


def test_checked_model_is_transparent_for_valid_models():
    model = LinearGaussianVAE((1, 4, 4), 2)
    wrapped = checked(model)
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(wrapped.encode(x)[0], model.encode(x)[0]) and wrapped.latent_dim == 2
    assert checked(wrapped) is wrapped and wrapped.unwrapped is model


# --- 4. every plugin parameter is range-checked before any work ----------------------------------------
@pytest.mark.parametrize("param, allowed", [
    ("max_damage.steps=-5", "an integer >= 1"),
    ("max_damage.steps=0", "an integer >= 1"),
    ("max_damage.eta_samples=0", "an integer >= 1"),
    ("max_damage.eta_samples=-3", "an integer >= 1"),
    ("max_damage.step_size=-1", "a number > 0"),
    ("max_damage.route=xyz", "one of 'both', 'mu', 'sigma'"),
    ("max_damage.route=[mu,xyz]", "one of 'both', 'mu', 'sigma'"),
    ("max_damage.restarts=-1", "an integer >= 0"),
    ("max_damage.optimizer=adam", "one of 'pgd', 'lbfgs'"),
    ("bound.p0_samples=0", "an integer >= 1 and <= 2147483648"),
    ("bound.jacobian_method=magic", "one of 'auto', 'exact', 'hutchinson'"),
    ("margin.samples_growth=1", "an integer >= 2"),
    ("margin.refine=-1", "an integer >= 0 and <= 16"),
    ("margin.samples_locate=0", "null or an integer >= 1"),
    ("margin.rel_tolerance=abc", "null or a number > 0 and <= 1"),
    ("margin.sigma_at=both", "one of 'clean', 'perturbed'"),
    ("margin.warm_start=3", "true or false"),
])
def test_bad_plugin_parameters_exit_2_naming_key_value_and_allowed(tmp_path, capsys, param, allowed):
    out = tmp_path / "run"
    assert main(["run", "--estimators", "margin,bound", "--param", param, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    key, value = param.split("=", 1)
    assert f"bad value for {key}:" in err and allowed in err, err
    assert value.strip("[]").split(",")[-1] in err
    assert not out.exists()


def test_builtin_defaults_satisfy_their_constraints():
    regs = plugins.get_registries()
    checked_any = 0
    for registry in (regs.attacks, regs.estimators):
        for name in registry.names():
            obj = registry.get(name)
            for key, spec in getattr(obj, "constraints", {}).items():
                assert key in obj.defaults, f"{name}: constraint on unknown parameter {key}"
                assert spec.accepts(obj.defaults[key]), f"{name}.{key} default {obj.defaults[key]!r}"
                checked_any += 1
    assert checked_any > 30


# --- 5. a single value for a swept parameter --------------------------------------------------------------
@pytest.mark.parametrize("flag, label", [("beta_vae.beta=2", "beta_vae(beta=2.0)"),
                                         ("beta_vae.beta=[2]", "beta_vae(beta=2.0)"),
                                         ("sigma_offset_vae.tau=0.5", "sigma_offset_vae(tau=0.5)")])
def test_single_value_for_a_swept_parameter(capsys, flag, label):
    from robbench.config import build_config, model_configs

    family = flag.split(".")[0]
    assert main(["run", "--models", family, "--param", flag, "--dry-run"]) == 0
    cfg = build_config({"models": [family], "model_params": {family: {flag.split(".")[1].split("=")[0]:
                                                                       2 if "beta" in flag else 0.5}}})
    assert [m.label for m in model_configs(cfg, plugins.get_registries())] == [label]


# --- 6. never write to a database robbench did not create ---------------------------------------------
def _foreign_store(run_dir: Path) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT)")
        db.execute("INSERT INTO accounts (owner) VALUES ('someone else')")
    return hashlib.sha256((run_dir / "results.sqlite").read_bytes()).hexdigest()


@pytest.mark.parametrize("command", ["leaderboard", "report", "run"])
def test_a_foreign_sqlite_file_is_refused_and_left_untouched(cache, tmp_path, capsys, command):
    run_dir = tmp_path / "run"
    before = _foreign_store(run_dir)
    args = [command, str(run_dir)] if command != "run" else ["run", *FAST, "--attacks", "noise", "--estimators",
                                                              "encoder_stats", "--out", str(run_dir)]
    assert main(args) == 2
    assert "not a robbench store" in capsys.readouterr().err
    assert hashlib.sha256((run_dir / "results.sqlite").read_bytes()).hexdigest() == before
    assert not (run_dir / "leaderboard.md").exists()


@pytest.mark.parametrize("command", ["leaderboard", "report", "run"])
def test_a_corrupt_store_exits_2(cache, tmp_path, capsys, command):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    args = [command, str(run_dir)] if command != "run" else ["run", *FAST, "--attacks", "noise", "--estimators",
                                                              "encoder_stats", "--out", str(run_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "robbench: error:" in err and "results.sqlite" in err


# --- 7. one invocation per run directory at a time --------------------------------------------------------
def test_a_run_directory_in_use_is_refused(cache, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", *FAST, "--attacks", "noise", "--estimators", "encoder_stats", "--out", str(out)]
    assert main(args) == 0
    rows, board = _rows(out), (out / "leaderboard.md").stat().st_mtime_ns
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from robbench.locks import FileLock
        assert FileLock({str(out / '.robbench.lock')!r}).try_acquire()
        print("held", flush=True)
        time.sleep(600)  # killed by the test
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main([*args, "--param", "encoder_stats.jacobian_probes=8"]) == 2  # another configuration
        err = capsys.readouterr().err
        assert f"run directory {out} is in use by process {other.pid}" in err and "another --out" in err
        assert _rows(out) == rows
        assert main(["leaderboard", str(out)]) == 0  # shows the board, leaves the files to the run
        assert "leaderboard files not rewritten" in capsys.readouterr().out
        assert (out / "leaderboard.md").stat().st_mtime_ns == board
    finally:
        other.kill()
        other.wait()
    assert main(args) == 0  # the kernel released the killed holder's lock
    assert not (out / ".robbench.lock").exists()


# --- 8. backend and device availability are checked before any work ------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("args, message", [
    (["--backend", "cuda"], "bad value for 'backend': 'cuda'; CUDA is not available here"),
    (["--backend", "cuda", "--device", "cuda"], "bad value for 'device': 'cuda'; CUDA is not available here"),
    (["--device", "cuda:0"], "bad value for 'device': 'cuda:0'; CUDA is not available here"),
])
def test_cuda_without_cuda_is_rejected_up_front(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cpp_backend_without_a_compiler_is_rejected(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kernels, "compiler_available", lambda: False)
    assert main(["run", "--backend", "cpp", "--out", str(tmp_path / "run")]) == 2
    assert "no C++ compiler and ninja were found" in capsys.readouterr().err


# --- 9. usage errors that used to be tracebacks ------------------------------------------------------------
def _bad_out(tmp_path: Path, kind: str) -> Path:
    if kind == "regular-file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f"
    if kind == "under-a-file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / "run"
    return Path("/proc/robbench-cannot-write-here")  # not writable, even for root


@pytest.mark.parametrize("kind, message", [("regular-file", "a file of that name exists"),
                                           ("under-a-file", "is a file, so no directory can be created"),
                                           ("not-writable", "cannot create the run directory")])
def test_unusable_out_exits_2(tmp_path, capsys, cache, kind, message):
    out = _bad_out(tmp_path, kind)
    assert main(["run", *FAST, "--attacks", "noise", "--estimators", "encoder_stats", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 20, "is not a text (UTF-8) file"),
                                              (None, "is a directory")])
def test_unreadable_config_exits_2(tmp_path, capsys, content, message):
    config = tmp_path / "c.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "nosuch_module_xyz:thing"], "cannot import 'nosuch_module_xyz'"),
    (["--model", "os:system"], "calling system() with no arguments failed"),
    (["--model", "os:sep"], "has no callable 'sep'"),
    (["--model", "nocolon"], "allowed: module:callable"),
])
def test_bench_bad_model_exits_2(capsys, args, message):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--samples", "abc"], "argument --samples: 'abc'"),
    (["--samples", "-5"], "give an integer >= 1"),
    (["--samples", "256,0"], "give an integer >= 1"),
    (["--points", "0"], "argument --points: 0 is not allowed"),
    (["--radius", "inf"], "argument --radius"),
    (["--repeats", "0"], "argument --repeats"),
])
def test_bench_bad_numbers_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# --- 10. minor findings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text, flags, message", [
    ("", ["--r", "inf"], "bad value for 'r': inf"),
    ("", ["--r", "nan"], "bad value for 'r': nan"),
    ("points: true\n", [], "bad value for 'points': True"),
    ("model_seeds: [true]\n", [], "bad value for 'model_seeds'"),
    ("train: {epochs: true}\n", [], "bad value for 'train.epochs'"),
])
def test_non_finite_and_boolean_numbers_are_rejected(tmp_path, capsys, yaml_text, flags, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert main(["run", "--config", str(config), *flags, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_stale_checkpoint_temporaries_are_cleaned(tmp_path):
    from robbench.training import clean_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"vae-0123.pt.{dead}.abc123.tmp"
    live = tmp_path / f"vae-0123.pt.{os.getpid()}.def456.tmp"  # a save in progress in this process
    ancient = tmp_path / "vae-0123.pt.x1y2.tmp"                 # old name format, a day old
    for f in (stale, live, ancient):
        f.write_bytes(b"partial")
    old = time.time() - 2 * 24 * 3600
    os.utime(ancient, (old, old))
    assert sorted(clean_stale_temporaries(tmp_path)) == sorted([stale, ancient])
    assert live.exists()


def test_leaderboard_files_are_replaced_together(cache, tmp_path, monkeypatch):
    from robbench import faults
    from robbench.leaderboard import write_leaderboard
    from robbench.store import ResultStore

    out = tmp_path / "run"
    assert main(["run", *FAST, "--attacks", "noise", "--estimators", "encoder_stats", "--out", str(out)]) == 0
    before = {n: (out / n).read_text() for n in ("leaderboard.md", "leaderboard.csv", "leaderboard.json")}

    def killed(name):
        if name == "leaderboard-write":
            raise KeyboardInterrupt  # stands in for a kill between writing and renaming

    monkeypatch.setattr(faults, "reached", killed)
    store = ResultStore.open_existing(out)
    with pytest.raises(KeyboardInterrupt):
        write_leaderboard(store, out)
    assert {n: (out / n).read_text() for n in before} == before  # the previous complete set is intact
    monkeypatch.setattr(faults, "reached", lambda name: None)
    write_leaderboard(store, out)
    store.close()
    assert not list(out.glob("*.tmp"))


def test_lost_models_table_is_reported_then_restored(cache, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", *FAST, "--models", "vae", "--param", "vae.latent_dim=2", "--param", "vae.hidden=16",
            "--epochs", "1", "--attacks", "noise", "--estimators", "encoder_stats", "--out", str(out)]
    assert main(args) == 0
    with sqlite3.connect(out / "results.sqlite") as db:
        db.execute("DROP TABLE models")
    capsys.readouterr()
    assert main(["leaderboard", str(out)]) == 0
    assert "test ELBO not shown for vae" in capsys.readouterr().out
    assert "test_elbo" not in json.loads((out / "leaderboard.json").read_text())["rows"][0]
    assert main(args) == 0  # the rerun loads the cached model again to restore its record
    assert json.loads((out / "leaderboard.json").read_text())["rows"][0]["test_elbo"] < 0


def test_attack_free_failures_are_counted_once():
    from robbench.leaderboard import leaderboard_rows
    from robbench.store import ResultRow

    rows = [ResultRow("b", p, "m", 0, "", "bound", "error", {}, "boom", 1.0) for p in range(4)]
    rows += [ResultRow(f"g{a}", p, "m", 0, a, "margin", "ok", {"margin": 1.0}, None, 1.0)
             for a in ("atk1", "atk2", "atk3") for p in range(4)]
    records = leaderboard_rows(rows)
    assert len(records) == 3
    assert sum(rec["failed"] for rec in records) == 4
    assert sum(rec["seconds"] for rec in records) == 16.0


def test_train_help_lists_only_what_train_uses_and_run_lists_backends(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    for unused in ("--attacks", "--estimators", "--points", "--r ", "--m ", "--confidence", "--backend", "--seed "):
        assert unused not in train_help, unused
    for used in ("--models", "--epochs", "--model-seeds", "--param", "--out", "--retrain", "--dry-run"):
        assert used in train_help
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    names = ",".join(["auto"] + plugins.get_registries().backends.names())
    assert f"--backend {{{names}}}" in capsys.readouterr().out and "torch" in names


# ---------------------------------------------------------------------------------------------
# Session 7: an outside reviewer's pass over the user-facing paths
# ---------------------------------------------------------------------------------------------
class _TinyData:
    """Registers the data set 'tiny_test': 8x8 images, ``train``/``test`` examples, optional NaN."""

    def __init__(self, train: int, test: int, nan: bool = False):
        self.train, self.test, self.nan = train, test, nan

    @hookimpl
    def register_datasets(self, register):
        from robbench.protocols import DatasetSpec, SplitData

        def load(options):
            gen = torch.Generator().manual_seed(0)
            test_x = torch.rand(self.test, 1, 8, 8, generator=gen)
            if self.nan:
                test_x[1, 0, 2, 3] = float("nan")
            return SplitData(torch.rand(self.train, 1, 8, 8, generator=gen), torch.zeros(self.train, dtype=torch.long),
                             test_x, torch.zeros(self.test, dtype=torch.long))

        register(DatasetSpec("tiny_test", "8x8 noise", load))


TRAIN_VAE = ["--dataset", "tiny_test", "--models", "vae", "--param", "vae.latent_dim=2", "--param", "vae.hidden=8",
             "--epochs", "1", "--estimators", "encoder_stats", "--points", "2", "--no-progress"]


def test_an_empty_training_split_is_refused_before_training(cache, tmp_path, plugin, capsys):
    """0 training examples used to 'train' a model on nothing and report its untrained numbers."""
    plugin(_TinyData(train=0, test=5))
    out = tmp_path / "run"
    assert main(["run", *TRAIN_VAE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data set 'tiny_test'" in err and "training split is empty" in err
    assert not out.exists()


def test_nan_in_a_data_set_is_refused_naming_it(cache, tmp_path, plugin, capsys):
    """NaN passed the range check (every comparison with NaN is false) and reached training."""
    plugin(_TinyData(train=20, test=5, nan=True))
    assert main(["run", *TRAIN_VAE, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data set 'tiny_test'" in err and "1 NaN or infinite value" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist_full", "--data-dir", "{tmp}/nowhere"], "does not exist"),
    (["--dataset", "mnist_full"], "pass --data-dir DIR"),
    (["--dataset", "digits", "--points", "100000"], "the test split holds only"),
])
def test_dry_run_checks_the_data_it_would_load(cache, tmp_path, capsys, args, message):
    """--dry-run said 'configuration valid' for runs whose data could not be loaded."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["run", *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "leaderboard"])
def test_ctrl_c_ends_with_one_line_and_status_130(cache, tmp_path, capsys, monkeypatch, command):
    """Ctrl-C printed a 40-line traceback; the rows committed so far are kept and a rerun resumes."""
    from robbench import cli, runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "run", interrupted)
    monkeypatch.setattr(cli, "cmd_leaderboard", interrupted)
    out = tmp_path / "run"
    args = ["run", *FAST, "--estimators", "bound", "--out", str(out)] if command == "run" else ["leaderboard", str(out)]
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("robbench: interrupted")
    if command == "run":
        assert "rerun the same command to resume" in err


def test_merge_into_a_file_exits_2(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--estimators", "bound", "--out", str(out)]) == 0
    target = tmp_path / "afile"
    target.write_text("")
    capsys.readouterr()
    assert main(["leaderboard", "--merge", str(out), "--out", str(target)]) == 2
    assert "afile" in capsys.readouterr().err


@pytest.mark.parametrize("margin", [False, True])
def test_bench_checks_its_json_target_before_timing(tmp_path, capsys, margin):
    """bench --json into a missing directory failed only after the whole benchmark had run."""
    target = tmp_path / "nowhere" / "bench.json"
    args = ["bench", "--json", str(target), "--samples", "64", "--backend", "torch"] + (["--margin"] if margin else [])
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "the directory" in captured.err and "does not exist" in captured.err
    assert "torch" not in captured.out  # nothing was timed


def test_a_model_that_cannot_be_loaded_shows_why_under_the_leaderboard(cache, tmp_path, capsys):
    """The rows of a model that failed to load said only 'see models table': `robbench leaderboard DIR`
    never showed the reason (here: a factory name that the file does not define)."""
    factory = tmp_path / "my_vae.py"
    factory.write_text("def make():\n    raise AssertionError('unreachable')\n")
    out = tmp_path / "run"
    args = ["run", *FAST, "--models", "torch_module", "--param", f"torch_module.factory={factory}:nomake",
            "--estimators", "encoder_stats", "--out", str(out)]
    assert main(args) == 0
    assert "seed 0: could not be trained or loaded: ValueError" in " ".join(capsys.readouterr().out.split())
    assert main(["leaderboard", str(out)]) == 0
    shown = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "failed rows for torch_module" in shown and "has no attribute 'nomake'" in shown


def test_ready_built_models_with_missing_files_or_packages_exit_2(cache, tmp_path, capsys, monkeypatch):
    """A missing weights file or a missing optional package was found only when the model was built,
    after the run had started (exit 0 with failed rows); both are inputs checked before any work."""
    import importlib.util

    factory = tmp_path / "my_vae.py"
    factory.write_text("def make():\n    raise AssertionError('unreachable')\n")
    missing = tmp_path / "nope.pt"
    out = tmp_path / "run"
    assert main(["run", *FAST, "--models", "torch_module", "--param", f"torch_module.factory={factory}:make",
                 "--param", f"torch_module.weights={missing}", "--estimators", "encoder_stats",
                 "--out", str(out)]) == 2
    assert f"weights={str(missing)!r} is not a file" in capsys.readouterr().err and not out.exists()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert main(["run", *FAST, "--models", "diffusers_autoencoder_kl", "--param",
                 f"diffusers_autoencoder_kl.path={tmp_path}", "--estimators", "encoder_stats",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs 'diffusers', which is not installed" in err and 'pip install "robbench[models]"' in err


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2 ** 64)], "bad value for 'seed': 18446744073709551616; allowed: an integer in [-2^63, 2^63 - 1]"),
    (["--seed", str(-2 ** 63 - 1)], "bad value for 'seed'"),
    (["--model-seeds", f"0,{2 ** 63}"], "bad value for 'model_seeds'"),
    (["--threads", "100000"], "bad value for 'threads': 100000; allowed: null or an integer from 1 to"),
])
def test_out_of_range_seeds_and_thread_counts_exit_2(capsys, flags, message):
    """A seed beyond 64 bits crashed in torch.manual_seed or SQLite with a traceback; 100000 threads made
    the OpenMP runtime fail to map memory, also with a traceback."""
    assert main(["run", *FAST, "--estimators", "bound", *flags, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("seed", [2 ** 63 - 1, -2 ** 63])
def test_the_extreme_64_bit_seeds_run(cache, tmp_path, seed):
    assert main(["run", *FAST, *MARGIN, "--seed", str(seed), "--out", str(tmp_path / "run")]) == 0
    assert {row[2] for row in _rows(tmp_path / "run")} == {"ok"}


def test_train_needs_no_more_test_points_than_the_data_set_has(cache, tmp_path, plugin, capsys):
    """`robbench train` (which takes no --points) failed on a data set with fewer test points than the
    default 25: 'bad value for points: 25'."""
    plugin(_TinyData(train=20, test=3))
    args = [a for a in TRAIN_VAE if a not in ("--estimators", "encoder_stats", "--points", "2")]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert main(["run", *TRAIN_VAE, "--points", "4", "--out", str(tmp_path / "run"), "--dry-run"]) == 2


def test_an_estimator_that_needs_an_attack_with_no_attack_is_refused(capsys):
    """--attacks '' --estimators margin planned 0 jobs, ran, and exited 0 with an empty leaderboard
    (evaluate returned an empty table)."""
    assert main(["run", *FAST, "--attacks", "", "--estimators", "margin,bound", "--dry-run"]) == 2
    assert "estimator 'margin' needs an attack and 'attacks' is empty" in capsys.readouterr().err
    assert main(["run", *FAST, "--attacks", "", "--estimators", "bound", "--dry-run"]) == 0
    with pytest.raises(ValueError, match="estimator 'margin' needs an attack and attacks is empty"):
        robbench_evaluate(LinearGaussianVAE(), torch.rand(2, 1, 8, 8), attacks=[], estimators=["margin"])


def robbench_evaluate(*args, **kwargs):
    import robbench

    return robbench.evaluate(*args, **kwargs)
