"""What a demanding new user's pass over the user paths found (session 8), one test per finding.

Each case failed before its fix, on real input: the console script itself, real data files, real runs
of the analytic linear-Gaussian VAE (no training) on the 8x8 digits.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from robbench.cli import main

FAST = ["--dataset", "digits", "--models", "linear_gaussian", "--points", "2", "--no-progress", "--backend", "torch"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- Ctrl-C while the command is still importing torch ------------------------------------------
# The console script imported robbench.cli, and with it torch (~1.5 s), before main() could catch
# Ctrl-C: an interrupt in that window printed a KeyboardInterrupt traceback from deep inside torch.
_INTERRUPT_TORCH_IMPORT = textwrap.dedent("""
    import sys
    from importlib.metadata import entry_points

    class Interrupt:  # Ctrl-C arriving while `import torch` runs, wherever that import comes from
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                raise KeyboardInterrupt
            return None

    sys.meta_path.insert(0, Interrupt())
    sys.argv = ["robbench", *sys.argv[1:]]
    if sys.argv[1:2] == ["-m"]:
        import runpy
        sys.argv = ["robbench", *sys.argv[2:]]
        runpy.run_module("robbench", run_name="__main__")
    else:  # exactly what the installed console script runs
        (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "robbench"]
        sys.exit(script.load()())
""")


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(how, tmp_path):
    args = ["run", "--models", "beta_vae", "--dry-run"]
    # cwd: not the checkout, whose stale robbench.egg-info (if a legacy build left one) would shadow the
    # installed entry points
    done = subprocess.run([sys.executable, "-c", _INTERRUPT_TORCH_IMPORT, *(["-m"] if how == "python-m" else []),
                           *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == ("robbench: interrupted; the results stored so far are kept: rerun the same "
                                   "command to resume")


def _console_script() -> str | None:
    here = Path(sys.executable).parent
    return next((str(here / n) for n in ("robbench", "robbench.exe") if (here / n).is_file()), None)


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_a_real_sigint_during_the_import_of_torch_exits_130_quietly(tmp_path):
    """A real SIGINT sent as soon as torch's libraries are mapped into the console script (its import
    then runs for about another second)."""
    script = _console_script()
    if script is None:
        pytest.skip("no robbench console script next to the interpreter")
    env = {**os.environ, "ROBBENCH_CACHE": str(tmp_path / "cache")}
    # On a loaded machine this process may not be scheduled again until the child has finished its whole
    # command (exit 0, nothing interrupted): such a late signal proves nothing, so try again, a few times.
    for _ in range(5):
        proc = subprocess.Popen([script, "plugins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        deadline = time.monotonic() + 60
        while not _maps_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    assert err.strip() == "robbench: interrupted"


# --- names, seeds or sweep values given twice ------------------------------------------------------
# `--models a,a`, `--model-seeds 0,0` or `beta: [1, 1.0]` planned every job twice: the banner promised
# twice the jobs, and a duplicated sweep value trained and evaluated the same model twice. Each distinct
# name, seed and value now runs once, with a note naming what was repeated.
@pytest.mark.parametrize("flags, jobs, note", [
    (["--models", "linear_gaussian,linear_gaussian", "--estimators", "bound,encoder_stats,bound"], 2,
     "'models' lists 'linear_gaussian' more than once"),
    (["--estimators", "margin", "--attacks", "noise,max_damage,noise"], 2, "'attacks' lists 'noise' more than once"),
    (["--models", "vae", "--model-seeds", "3,3,4", "--estimators", "bound"], 2, "'model_seeds' lists 3 more than once"),
    (["--models", "beta_vae", "--param", "beta_vae.beta=[1,1.0,2]", "--estimators", "bound"], 2,
     "beta_vae.beta lists 1.0 more than once"),
    (["--estimators", "margin", "--param", "max_damage.route=[mu,mu]"], 1, "max_damage.route lists 'mu' more than once"),
])
def test_a_name_seed_or_sweep_value_given_twice_runs_once_with_a_note(cache, tmp_path, capsys, flags, jobs, note):
    assert main(["run", *FAST, *flags, "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"configuration valid: {jobs} job{'s' if jobs > 1 else ''} × 2 points" in out
    assert f"robbench: note: {note}; it runs once" in out


def test_a_repeated_seed_prepares_one_model(cache, tmp_path, capsys):
    """It was trained, then loaded again from the cache for the second, identical copy of its jobs."""
    import sqlite3

    out = tmp_path / "run"
    args = ["run", *FAST, "--models", "vae", "--model-seeds", "0,0", "--epochs", "1", "--estimators", "encoder_stats",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("trained in") == 1 and "loaded from cache" not in printed
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT job_key) FROM results").fetchone() == (2, 1)


def test_evaluate_runs_a_repeated_attack_once_and_warns():
    import torch

    from robbench import evaluate
    from robbench.config import RepeatedValueWarning
    from robbench_plugins.analytic import LinearGaussianVAE

    model = LinearGaussianVAE(input_shape=(6,), latent_dim=2)
    x = torch.full((2, 6), 0.5)
    with pytest.warns(RepeatedValueWarning, match="'attacks' lists 'noise' more than once; it runs once"):
        table = evaluate(model, x, attacks=["noise", "noise"], estimators=["probability"],
                         estimator_params={"probability": {"samples": 64}}, backend="torch")
    assert len(table) == 2


# --- a corrupt image in an image_folder data set ---------------------------------------------------
# Images are read lazily, so a file that is not an image, or a truncated one, failed the model at
# training time ("could not be trained or loaded: OSError: image file is truncated", exit 0, no file
# named). Now loading checks every file and names the bad one (exit 2, also on --dry-run); what only a
# full decode finds stops the run with exit 2 naming the file instead of failing the model's rows.
def _image_folder(root: Path, fmt: str = "png") -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            paths.append(root / label / f"{i}.{fmt}")
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(paths[-1])
    return paths


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])


@pytest.mark.parametrize("damage", ["not-an-image", "empty", "truncated-png", "truncated-jpeg", "flipped-byte-png"])
def test_a_corrupt_image_is_named_when_the_data_set_loads(cache, tmp_path, capsys, damage):
    pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    paths = _image_folder(root, "jpg" if damage == "truncated-jpeg" else "png")
    bad = paths[7]
    if damage == "not-an-image":
        bad.write_text("this is not an image")
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "flipped-byte-png":
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    else:
        _truncated(bad)
    args = ["run", "--dataset", "image_folder", "--data-dir", str(root), "--models", "vae", "--points", "2",
            "--estimators", "encoder_stats", "--epochs", "1", "--no-progress", "--backend", "torch",
            "--out", str(tmp_path / "run")]
    assert main([*args, "--dry-run"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"image file {bad} cannot be read" in err and "fix or remove it" in err


def test_an_image_that_breaks_after_loading_stops_the_run_naming_it(cache, tmp_path, capsys):
    """A file damaged after the check (or a defect only a full decode finds): exit 2 naming the file,
    not a model whose rows fail with Pillow's bare 'image file is truncated'."""
    pytest.importorskip("PIL.Image")
    import robbench.plugins as plugins
    from robbench.protocols import DataOptions
    from robbench_plugins import imagedata

    root = tmp_path / "images"
    _image_folder(root)
    data = imagedata.load_image_folder(DataOptions(data_dir=root))
    _truncated(data.train_x.paths[0])
    with pytest.raises(FileNotFoundError, match=f"image file {data.train_x.paths[0]} cannot be read: .*truncated"):
        data.train_x[0:2]
    original = imagedata.load_image_folder

    def load_then_damage(options):
        loaded = original(options)
        _truncated(loaded.train_x.paths[1])
        return loaded

    spec = plugins.get_registries().datasets.get("image_folder")
    try:
        object.__setattr__(spec, "load", load_then_damage)
        code = main(["run", "--dataset", "image_folder", "--data-dir", str(root), "--models", "vae", "--points", "2",
                     "--estimators", "encoder_stats", "--epochs", "1", "--no-progress", "--backend", "torch",
                     "--out", str(tmp_path / "run")])
    finally:
        object.__setattr__(spec, "load", original)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "cannot be read" in err and "fix or remove it" in err, err


# --- README commands ------------------------------------------------------------------------------
def _readme_commands() -> list[str]:
    """The ``robbench ...`` commands of README.md's bash blocks (continuation lines joined, comments cut)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("robbench "):
                commands.append(line)
    return commands


def test_readme_reads_each_run_from_the_directory_the_run_before_it_wrote():
    """README ran `robbench run --models beta_vae,lipschitz_vae ...` and then read
    `runs/beta_vae,lipschitz_vae__max_damage__mnist`; the run writes runs/beta_vae+lipschitz_vae__...:
    the printed report command found no run directory."""
    import shlex

    from robbench.cli import build_parser, config_from_args, default_run_dir

    commands = _readme_commands()
    pairs = [(run, read) for run, read in zip(commands, commands[1:])
             if run.startswith("robbench run ") and "--out" not in run and "--executor" not in run
             and read.split()[1] in ("report", "leaderboard")]
    assert pairs, "README has no run command followed by a command that reads its directory"
    for run, read in pairs:
        args = build_parser().parse_args(shlex.split(run)[1:])
        expected = default_run_dir(config_from_args(args), args.config)
        assert Path(shlex.split(read)[2]) == expected, f"{read!r} after {run!r}: the run writes {expected}"


# --- the report's bound claim on margins that do not vary ---------------------------------------------
def test_the_bound_claim_is_not_tested_where_r_is_the_same_at_every_point():
    """A small run whose margins were all censored at the cap (R >= 10 at every point) gave Pearson
    ρ = nan and the verdict "not supported": a correlation that cannot be computed is no evidence against
    the claim."""
    from robbench.paper.claims import NOT_TESTED, bound_claim
    from robbench.store import ResultRow

    rows = []
    for p in range(4):
        rows.append(ResultRow("m", p, "vae", 0, "max_damage", "margin", "ok",
                              {"margin": None, "margin_lo": 10.0, "margin_hi": None, "censored": True}, None, 0.1))
        rows.append(ResultRow("b", p, "vae", 0, "", "bound", "ok",
                              {"bound": 1.0 + 0.1 * p, "bound_status": "ok", "min_sigma": 0.5,
                               "jacobian_frobenius": 2.0 + p}, None, 0.1))
    claim = bound_claim(rows)
    assert claim.verdict == NOT_TESTED, claim
    assert "R is the same at every point (4 points, all censored at the cap)" in claim.evidence


# --- from_file: a checkpoint path that does not exist, or one that starts with ~ ------------------------
def test_from_file_checks_its_path_up_front_and_expands_the_home_directory(cache, tmp_path, capsys, monkeypatch):
    """A missing checkpoint ran the whole invocation and failed every row (exit 0); `path=~/ckpt.pt` (the
    shell does not expand ~ after `=`, and YAML never does) was looked up as a folder named '~'."""
    import shutil

    base = ["run", "--dataset", "digits", "--models", "from_file", "--estimators", "encoder_stats", "--points", "2",
            "--no-progress", "--backend", "torch"]
    assert main([*base, "--param", f"from_file.path={tmp_path / 'nope.pt'}", "--out", str(tmp_path / "r0")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"checkpoint {tmp_path / 'nope.pt'} does not exist" in err
    assert not (tmp_path / "r0").exists()

    assert main(["train", "--dataset", "digits", "--models", "vae", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "trained")]) == 0
    (checkpoint,) = (cache / "models").glob("vae-*.pt")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(checkpoint, home / "ckpt.pt")
    monkeypatch.setenv("HOME", str(home))
    capsys.readouterr()
    assert main([*base, "--param", "from_file.path=~/ckpt.pt", "--out", str(tmp_path / "r1")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ready-built" in out and "could not be" not in out, out


def test_a_linear_gaussian_latent_larger_than_the_input_says_so():
    """latent_dim > the input dimension failed with torch's 'mat1 and mat2 shapes cannot be multiplied'."""
    from robbench_plugins.analytic import LinearGaussianVAE

    with pytest.raises(ValueError, match=r"latent_dim=100 exceeds the input dimension 64 \(input shape \(1, 8, 8\)\)"):
        LinearGaussianVAE((1, 8, 8), 100)


# --- numbers in scientific notation -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flag", "yaml"])
def test_scientific_notation_is_a_number_in_params_and_config_files(tmp_path, capsys, how):
    """PyYAML follows YAML 1.1, where 1e-3 (no dot, no exponent sign) is text: `--param
    margin.tolerance=1e-3` was refused as "bad value for margin.tolerance: '1e-3'", a value the user typed
    as a number. Now 1e-3, 1E4 and 2.5e+2 are numbers, as in YAML 1.2 and JSON."""
    out = str(tmp_path / "run")
    if how == "flag":
        args = ["run", *FAST, "--estimators", "margin", "--param", "margin.tolerance=1e-3",
                "--param", "margin.samples_max=2.5e+4", "--dry-run", "--out", out]
    else:
        config = tmp_path / "c.yaml"
        config.write_text("estimator_params:\n  margin: {tolerance: 1e-3, max_radius: 1E1}\nr: 4e0\n")
        args = ["run", *FAST, "--estimators", "margin", "--config", str(config), "--dry-run", "--out", out]
    assert main(args) == 0, capsys.readouterr().err

    from robbench.config import load_yaml

    path = tmp_path / "n.yaml"
    path.write_text("a: 1e-3\nb: 1E4\nc: -2.5e+2\nd: 1_000\ne: '1e-3'\nf: 1.5\ng: e5\nh: .inf\n")
    assert load_yaml(path) == {"a": 1e-3, "b": 1e4, "c": -250.0, "d": 1000, "e": "1e-3", "f": 1.5, "g": "e5",
                               "h": float("inf")}


def test_a_whole_float_for_an_integer_parameter_is_that_integer():
    """samples_max=2.5e+4 or 4096.0 ran with a float where the estimator counts samples, and keyed its job
    apart from samples_max=4096 (a rerun with the integer recomputed instead of resuming)."""
    from robbench.config import merge_params
    from robbench.plugins import get_registries

    margin = get_registries().estimators.get("margin")
    merged = merge_params(margin, {"samples_max": 25000.0, "samples_initial": 64})
    assert merged["samples_max"] == 25000 and type(merged["samples_max"]) is int
    assert type(merged["samples_initial"]) is int
    assert type(merge_params(margin, {"max_radius": 10})["max_radius"]) is float  # as before: 1 and 1.0 agree


# --- the npz data set: a user's own arrays -------------------------------------------------------------
def _digits_arrays():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).astype("uint8"), digits.target  # (N, 8, 8) uint8 0..255, (N,)


@pytest.mark.parametrize("layout", ["split", "one-file"])
def test_the_npz_data_set_runs_on_a_users_arrays(cache, tmp_path, capsys, layout):
    """A data set in numpy files needed a plugin: now `--dataset npz --data-dir DIR` reads DIR/train.npz and
    DIR/test.npz (or one DIR/data.npz, split 80/20, seeded and stratified by y) with arrays x and y."""
    import numpy as np
    import torch

    from robbench.protocols import DataOptions
    from robbench.plugins import get_registries

    images, labels = _digits_arrays()
    root = tmp_path / "arrays"
    root.mkdir()
    if layout == "split":
        np.savez(root / "train.npz", x=images[:1400], y=labels[:1400])
        np.savez_compressed(root / "test.npz", x=images[1400:].astype(np.float32) / 255)  # floats in [0, 1], no y
    else:
        np.savez(root / "data.npz", x=images[:, None], y=labels)  # (N, 1, H, W)
    split = get_registries().datasets.get("npz").load(DataOptions(data_dir=root))
    assert split.train_x.dtype == split.test_x.dtype == torch.float32 and split.input_shape == (1, 8, 8)
    assert 0 <= float(split.train_x.min()) and float(split.train_x.max()) <= 1
    if layout == "split":
        assert len(split.train_x) == 1400 and len(split.test_x) == len(images) - 1400
        assert torch.allclose(split.train_x[:5, 0], torch.from_numpy(images[:5]).float() / 255)
        assert split.test_y.tolist() == [0] * len(split.test_x)
    else:
        assert len(split.train_x) + len(split.test_x) == len(images)
        assert abs(len(split.test_x) - 0.2 * len(images)) <= 10
    out = tmp_path / "run"
    assert main(["run", "--dataset", "npz", "--data-dir", str(root), "--models", "vae", "--epochs", "1",
                 "--estimators", "encoder_stats", "--points", "2", "--no-progress", "--backend", "torch",
                 "--out", str(out)]) == 0
    assert "could not be" not in capsys.readouterr().out


@pytest.mark.parametrize("files, message", [
    ({}, "expected train.npz and test.npz, or data.npz"),
    ({"data.npz": {"images": "u8"}}, "data.npz holds no array 'x' (it holds: images)"),
    ({"data.npz": {"x": "u8", "y": "short"}}, "'y' has 3 entries for 50 examples in 'x'"),
    ({"data.npz": {"x": "flat"}}, "'x' has shape (50,); expected (N, H, W) or (N, C, H, W)"),
    ({"data.npz": {"x": "text"}}, "'x' has dtype <U1; expected numbers"),
    ({"data.npz": {"x": "objects"}}, "cannot be read without pickle"),
    ({"train.npz": {"x": "u8"}}, "expected train.npz and test.npz, or data.npz"),
    # channels last (numpy's, Keras's layout) was read as 8 channels of 8 x 3 images, without a word
    ({"data.npz": {"x": "hwc"}}, "'x' has shape (50, 8, 8, 3): channels last? expected (N, C, H, W)"),
])
def test_the_npz_data_set_names_what_is_wrong(cache, tmp_path, capsys, files, message):
    import numpy as np

    arrays = {"u8": np.zeros((50, 8, 8), np.uint8), "short": np.zeros(3, np.int64), "flat": np.zeros(50),
              "text": np.array(["a"] * 50), "objects": np.array([{"a": 1}] * 50, dtype=object),
              "hwc": np.zeros((50, 8, 8, 3), np.uint8)}
    root = tmp_path / "arrays"
    root.mkdir()
    for name, content in files.items():
        np.savez(root / name, **{k: arrays[v] for k, v in content.items()})
    assert main(["run", "--dataset", "npz", "--data-dir", str(root), "--models", "vae", "--points", "2",
                 "--dry-run"]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_a_trend_claim_is_not_tested_where_every_value_is_the_same():
    """Margins censored at the cap for every β gave Spearman nan and "R grows with β: not supported"."""
    from robbench.paper.claims import NOT_TESTED, check_claims
    from robbench.store import ResultRow

    rows = [ResultRow(f"m{beta}", p, f"beta_vae(beta={beta})", 0, "max_damage", "margin", "ok",
                      {"margin": None, "margin_lo": 10.0, "margin_hi": None, "censored": True}, None, 0.1)
            for beta in (0.1, 1.0, 10.0) for p in range(3)]
    (claim,) = [c for c in check_claims(rows) if c.key == "R_beta"]
    assert claim.verdict == NOT_TESTED, claim
    assert "R is the same at every point (9 points, all censored at the cap)" in claim.evidence


def test_a_paired_trend_claim_is_not_tested_where_every_value_is_the_same():
    from robbench.paper.claims import NOT_TESTED, check_claims
    from robbench.store import ResultRow

    rows = [ResultRow(f"m{tau}-{seed}", p, f"sigma_offset_vae(tau={tau})", seed, "max_damage", "margin", "ok",
                      {"margin": None, "margin_lo": 10.0, "margin_hi": None, "censored": True}, None, 0.1)
            for tau in (0.0, 0.5, 1.0) for seed in (0, 1) for p in range(2)]
    (claim,) = [c for c in check_claims(rows) if c.key == "R_tau_paired"]
    assert claim.verdict == NOT_TESTED, claim
    assert "R is the same at every point (12 points, all censored at the cap)" in claim.evidence


def test_npz_arrays_in_another_range_declare_it(cache, tmp_path, capsys):
    """Standardised arrays (not in [0, 1]) were refused with a hint about SplitData.input_range, which an npz
    user cannot set; an array `input_range` = [lo, hi] in the file declares the box (mapped onto [0, 1])."""
    import numpy as np

    images, labels = _digits_arrays()
    x = images.astype(np.float32) / 255 * 4 - 2  # in [-2, 2]
    root = tmp_path / "arrays"
    root.mkdir()
    np.savez(root / "data.npz", x=x, y=labels)
    args = ["run", "--dataset", "npz", "--data-dir", str(root), "--models", "vae", "--epochs", "1",
            "--estimators", "encoder_stats", "--points", "2", "--no-progress", "--backend", "torch"]
    assert main([*args, "--dry-run"]) == 2
    assert "outside the declared input range [0, 1]" in " ".join(capsys.readouterr().err.split())
    np.savez(root / "data.npz", x=x, y=labels, input_range=np.array([-2.0, 2.0]))
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert "could not be" not in capsys.readouterr().out
    np.savez(root / "data.npz", x=x, y=labels, input_range=np.array([2.0, -2.0]))
    assert main([*args, "--dry-run"]) == 2
    assert "'input_range' must be [lo, hi] with lo < hi" in " ".join(capsys.readouterr().err.split())


def test_evaluate_names_what_a_model_without_the_vae_methods_lacks():
    """A plain nn.Module failed deep inside an estimator: "'Linear' object has no attribute 'encode'"."""
    import torch

    from robbench import evaluate

    with pytest.raises(TypeError, match=r"model Linear lacks encode\(x\) -> \(mu, sigma\), decode\(z\), latent_dim, "
                                        r"input_shape \(e.g. \(1, 28, 28\)\); see robbench.protocols.VAEModel"):
        evaluate(torch.nn.Linear(64, 64), torch.rand(2, 64), estimators=["bound"])


# --- session 9: a value that starts with '-' ---------------------------------------------------------
# argparse takes a token that starts with '-' and is not a plain number for an option: `--model-seeds -1,2`
# (seeds may be negative: settings.SEED_RANGE) failed with "expected one argument"; only `--model-seeds=-1,2`
# worked. A value of an option that takes one is now read as that value.
@pytest.mark.parametrize("flags, expect", [
    (["--model-seeds", "-1,2"], "configuration valid: 2 jobs × 2 points"),
    (["--model-seeds", "-3"], "configuration valid: 1 job × 2 points"),
    (["--model-seeds", "-1,-2", "--seed", "-5"], "configuration valid: 2 jobs × 2 points"),
    # an abbreviated option name, as argparse accepts it (review rc: was "expected one argument")
    (["--model-seed", "-1,2"], "configuration valid: 2 jobs × 2 points"),
])
def test_a_negative_leading_value_is_the_options_value(cache, tmp_path, capsys, flags, expect):
    assert main(["run", *FAST, "--models", "vae", "--estimators", "bound", *flags, "--dry-run",
                 "--out", str(tmp_path / "run")]) == 0
    assert expect in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("flags, message", [
    (["--r", "-1e-3"], "bad value for 'r': -0.001"),
    (["--model-seeds", "-1,x"], "bad value for 'model_seeds'"),
])
def test_a_bad_negative_leading_value_is_judged_as_a_value(cache, tmp_path, capsys, flags, message):
    assert main(["run", *FAST, *flags, "--dry-run", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "expected one argument" not in err, err


# --- session 9: export / leaderboard --out --------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished run of the analytic model (no training): 2 points, bound + encoder_stats."""
    root = tmp_path_factory.mktemp("small_run")
    env = {"ROBBENCH_CACHE": str(root / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["run", *FAST, "--estimators", "bound,encoder_stats", "--out", str(root / "run")]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return root / "run"


def test_export_to_a_directory_is_refused_and_leaves_nothing(small_run, tmp_path, capsys):
    """`export RUN --out DIR` (an existing directory) ended in an IsADirectoryError traceback and left
    DIR.tmp beside it."""
    target = tmp_path / "out"
    target.mkdir()
    assert main(["export", str(small_run), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--out {target}: that is a directory; give a file name" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_into_a_folder_not_yet_made_makes_it(small_run, tmp_path, capsys):
    """It failed with "No such file or directory: '.../e.json.tmp'" (a temporary the user never named)."""
    import json

    path = tmp_path / "new" / "deeper" / "e.json"
    assert main(["export", str(small_run), "--out", str(path)]) == 0
    assert json.loads(path.read_text())[0]["model"] == "linear_gaussian"


def test_leaderboard_out_without_merge_is_refused(small_run, tmp_path, capsys):
    """`leaderboard RUN --out DIR` printed the board and wrote nothing to DIR, silently (--out goes with
    --merge)."""
    assert main(["leaderboard", str(small_run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--out goes with --merge" in err and not (tmp_path / "x").exists(), err


def test_a_replacement_whose_rename_fails_leaves_no_temporary(tmp_path):
    """robbench.atomic: a rename that failed (the target is a directory) left NAME.tmp behind."""
    from robbench.atomic import replace_texts

    (tmp_path / "b.csv").mkdir()
    with pytest.raises(IsADirectoryError):
        replace_texts(tmp_path, {"a.csv": "1\n", "b.csv": "2\n"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


def test_a_training_setting_given_as_param_says_where_it_goes(cache, tmp_path, capsys):
    """`--param train.lr=0.01` answered "no model, attack or estimator is called 'train'" and listed two
    dozen plugins; training settings live in the config's train: section (and --epochs)."""
    assert main(["run", *FAST, "--param", "train.lr=0.01", "--dry-run", "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "training settings are not plugin parameters" in err and "train: section" in err, err
    assert "(epochs, batch_size, lr, patience)" in err and "--epochs" in err, err


@pytest.mark.parametrize("text, key, line", [("points: 3\nseed: 1\npoints: 4\n", "points", 3),
                                             ("train:\n  epochs: 1\n  epochs: 2\n", "epochs", 3),
                                             ("model_params:\n  vae: {hidden: 8, hidden: 16}\n", "hidden", 2)])
def test_a_key_given_twice_in_a_config_file_is_refused(cache, tmp_path, capsys, text, key, line):
    """PyYAML keeps the last of two equal keys: `points: 3 ... points: 4` ran 4 points, silently (YAML
    forbids duplicate keys). At every level it is now an error naming the key and its line."""
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["run", *FAST, "--config", str(config), "--dry-run", "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"key {key!r} is given twice" in err and f'in "{config}", line {line}' in err, err


def test_a_dry_run_refuses_a_run_directory_that_is_a_file(cache, tmp_path, capsys):
    """`--dry-run --out FILE` said "configuration valid"; the real run then refused the file."""
    target = tmp_path / "afile"
    target.write_text("")
    assert main(["run", *FAST, "--estimators", "bound", "--dry-run", "--out", str(target)]) == 2
    assert "a file of that name exists" in capsys.readouterr().err


def test_the_same_results_merged_twice_count_once_with_a_note(small_run, tmp_path, capsys):
    """`leaderboard --merge RUN RUN` (or a run and its own export) listed every row twice, as two
    'models' with the same numbers, labelled 'linear_gaussian [RUN]' both."""
    import json

    exported = tmp_path / "e.json"
    assert main(["export", str(small_run), "--out", str(exported)]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--merge", str(small_run), str(small_run), str(exported),
                 "--out", str(tmp_path / "m")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    rows = json.loads((tmp_path / "m" / "leaderboard.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["linear_gaussian"], rows
    assert "robbench: note:" in out and "the same results" in out, out


@pytest.mark.parametrize("text, expect", [("model_seeds: 0,1\n", "configuration valid: 2 jobs"),
                                          ("model_seeds: '-1, 2'\n", "configuration valid: 2 jobs")])
def test_model_seeds_written_as_on_the_command_line_in_a_config_file(cache, tmp_path, capsys, text, expect):
    """`model_seeds: 0,1` (YAML reads the unquoted 0,1 as text, as it is written after --model-seeds) was
    split into the strings '0' and '1' and refused: "bad value for 'model_seeds': ['0', '1']"."""
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["run", *FAST, "--models", "vae", "--estimators", "bound", "--config", str(config), "--dry-run",
                 "--out", str(tmp_path / "run")]) == 0
    assert expect in " ".join(capsys.readouterr().out.split())
