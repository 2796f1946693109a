"""Self-describing results: provenance in the store and leaderboard.json, export, merge, --version,
ResultTable.to_pandas."""
from __future__ import annotations

import json
import math

import pytest
import torch

import robbench
from robbench import cli
from robbench.entries import ENTRY_FORMAT, EntryError, MergeError, check_comparable, load_entries, validate_entry
from robbench.store import ResultStore


def _run(tmp_path, name: str, *extra: str):
    out = tmp_path / name
    code = cli.main(["run", "--dataset", "digits", "--models", "linear_gaussian", "--estimators", "encoder_stats,min_r",
                     "--param", "min_r.samples=64", "--points", "3", "--backend", "torch", "--out", str(out), "--no-progress", *extra])
    assert code == 0
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))


def test_runs_record_settings_versions_device_and_commit(tmp_path, cache):
    out = _run(tmp_path, "a", "--r", "3.0")
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["format"] == "robbench-leaderboard/1"
    assert board["settings"]["r"] == 3.0 and board["settings"]["dataset"] == "digits"
    assert board["settings"]["estimators"]["min_r"]["params"]["samples"] == 64
    env = board["environment"]
    assert env["robbench"] == robbench.__version__
    assert env["torch"]["version"] == torch.__version__ and "cuda" in env["torch"]
    assert env["device"]["name"] == "cpu" and env["packages"]["numpy"]
    assert env["git"] is None or len(env["git"]["commit"]) == 40
    assert board["models"]["linear_gaussian"]["family"] == "linear_gaussian"
    store = ResultStore.open_existing(out)
    assert store.provenance()["settings"] == board["settings"]
    store.close()


def test_export_writes_one_valid_entry_per_model_configuration(tmp_path, cache):
    out = _run(tmp_path, "a")
    assert cli.main(["export", str(out)]) == 0
    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    entries = json.loads((out / "entries.json").read_text(), parse_constant=no_nan)
    assert len(entries) == 1
    (entry,) = entries
    assert validate_entry(entry) is entry and entry["format"] == ENTRY_FORMAT
    assert entry["model"] == "linear_gaussian" and entry["params"]["s"] == 0.5
    assert entry["results"][0]["points"] == 3
    broken = dict(entry)
    del broken["settings"]
    with pytest.raises(EntryError, match="missing field 'settings'"):
        validate_entry(broken)


def test_merge_refuses_runs_with_different_r_and_names_it(tmp_path, cache, capsys):
    a = _run(tmp_path, "a", "--r", "4.0")
    b = _run(tmp_path, "b", "--r", "2.0")
    with pytest.raises(MergeError, match=r"r differs \(4\.0 in .*a; 2\.0 in .*b\)"):
        check_comparable(load_entries(a) + load_entries(b))
    capsys.readouterr()
    assert cli.main(["leaderboard", "--merge", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "refusing to merge" in err and "r differs" in err


def test_merge_of_comparable_runs_writes_one_leaderboard(tmp_path, cache):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", "--param", "linear_gaussian.s=0.25")
    cli.main(["export", str(b), "--out", str(tmp_path / "b.json")])
    merged = tmp_path / "merged"
    assert cli.main(["leaderboard", "--merge", str(a), str(tmp_path / "b.json"), "--out", str(merged)]) == 0
    doc = json.loads((merged / "leaderboard.json").read_text())
    assert len(doc["rows"]) == 2 and doc["settings"]["r"] == 4.0
    sigmas = sorted(rec["min_sigma_mean"] for rec in doc["rows"])
    assert sigmas == pytest.approx([0.25, 0.5])


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"robbench {robbench.__version__}"


def test_result_table_to_pandas():
    pd = pytest.importorskip("pandas")
    from robbench.api import ResultTable

    table = ResultTable([{"attack": None, "estimator": "bound", "point": 0, "bound": 0.5},
                         {"attack": "a", "estimator": "margin", "point": 1, "margin": 1.5}])
    frame = table.to_pandas()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["attack", "estimator", "point", "bound", "margin"]
    assert frame.loc[1, "margin"] == 1.5 and pd.isna(frame.loc[0, "margin"])


def test_infinite_values_survive_export_and_merge_as_inf():
    """A censored margin's interval [lo, inf) and an unbounded bound mean (+inf) are written "inf" in
    entries (as in leaderboard.json), not null, and read back as floats when entries are merged."""
    from robbench.entries import _clean, _number_back

    rec = {"model": "m", "attack": "max_damage", "margin_mean": 5.2, "margin_mean_ci_hi": math.inf,
           "bound_mean": -math.inf, "x": math.nan}
    clean = _clean(rec)
    assert clean == {"model": "m", "attack": "max_damage", "margin_mean": 5.2, "margin_mean_ci_hi": "inf",
                     "bound_mean": "-inf", "x": None}
    back = {k: _number_back(k, v) for k, v in json.loads(json.dumps(clean)).items()}
    assert back["margin_mean_ci_hi"] == math.inf and back["bound_mean"] == -math.inf and back["model"] == "m"


def test_threads_flag_and_key_are_used_for_the_run_and_recorded(tmp_path, cache, monkeypatch):
    """--threads N: torch runs the estimation with N threads (seen from inside an estimate), the provenance
    records the request and the count in effect, and the process's setting is restored afterwards; the YAML
    key does the same; a bad value exits 2 before any work."""
    from robbench import montecarlo

    seen: list[int] = []

    def spying(real):
        def spy(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)
        return spy

    for name in ("count_within", "sample_distances"):  # min_r decodes through the latter
        monkeypatch.setattr(montecarlo, name, spying(getattr(montecarlo, name)))
    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    out = _run(tmp_path, "a", "--threads", str(target))
    assert seen and set(seen) == {target}
    assert torch.get_num_threads() == before
    board = json.loads((out / "leaderboard.json").read_text())
    store = ResultStore.open_existing(out)
    prov = store.provenance()
    store.close()
    assert prov["run"]["threads"] == target and prov["environment"]["device"]["threads"] == target
    assert board["environment"]["device"]["threads"] == target
    config = tmp_path / "c.yaml"
    config.write_text("threads: 1\n")
    seen.clear()
    out = _run(tmp_path, "b", "--config", str(config))
    assert set(seen) == {1}
    store = ResultStore.open_existing(out)
    assert store.provenance()["run"]["threads"] == 1
    store.close()
    assert cli.main(["run", "--threads", "0", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_the_run_record_names_the_points_seed_and_batch_it_measured(tmp_path, cache):
    """point_seed picks the points (a retest run shares it with another seed); point_batch changes the last
    bits of results (float rounding). Both must be in the provenance a reader gets (leaderboard.json, and
    through it entries.json); before, only `seed` was, so a retest run's points could not be reproduced."""
    config = tmp_path / "c.yaml"
    config.write_text("point_seed: 7\npoint_batch: 2\n")
    out = _run(tmp_path, "a", "--config", str(config), "--seed", "3")
    run = json.loads((out / "leaderboard.json").read_text())["run"]
    assert run["seed"] == 3 and run["point_seed"] == 7 and run["point_batch"] == 2
    out = _run(tmp_path, "b", "--seed", "3")
    run = json.loads((out / "leaderboard.json").read_text())["run"]
    assert run["point_seed"] == 3 and run["point_batch"] == 25  # the default: the points `seed` selects


def test_merge_carries_whose_values_a_shared_column_shows(tmp_path, cache):
    """A record whose "mean damage" came from likelihood (every damage row failed: damage_mean_from, see
    test_leaderboard) keeps that mark through export and `leaderboard --merge`: the merged Markdown says
    "(from likelihood)" and the merged CSV and JSON carry damage_mean_from."""
    out = tmp_path / "run"
    assert cli.main(["run", "--dataset", "digits", "--models", "linear_gaussian", "--estimators", "damage,likelihood",
                     "--points", "2", "--backend", "torch", "--out", str(out), "--no-progress"]) == 0
    cli.main(["export", str(out), "--out", str(tmp_path / "e.json")])
    entries = json.loads((tmp_path / "e.json").read_text())
    (rec,) = entries[0]["results"]
    assert "damage_mean" in rec and "damage_mean_from" not in rec  # both ran: damage's own values
    rec["damage_mean_from"] = "likelihood"  # as the leaderboard writes it when every damage row failed
    (tmp_path / "e.json").write_text(json.dumps(entries))
    merged = tmp_path / "merged"
    assert cli.main(["leaderboard", "--merge", str(tmp_path / "e.json"), "--out", str(merged)]) == 0
    assert " (from likelihood) |" in (merged / "leaderboard.md").read_text()
    assert json.loads((merged / "leaderboard.json").read_text())["rows"][0]["damage_mean_from"] == "likelihood"
    assert "damage_mean_from" in (merged / "leaderboard.csv").read_text().splitlines()[0]
