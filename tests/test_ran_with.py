"""Each result row records the attack engine and Monte Carlo backend that actually ran (``--backend auto``
and ``engine: auto`` resolve per machine and fall back to torch when the compiled extension does not load),
the report shows them per invocation, and a resume that would mix attack engines under one job key is
refused (robbench.resume_engines). The fallback is forced by making the extension look unavailable."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from robbench import kernels
from robbench.cli import main
from robbench.store import ResultRow, ResultStore

COMPILED = {"attack_engine": "compiled", "mc_backend": "cpp"}
FALLBACK = {"attack_engine": "torch", "mc_backend": "torch"}
RUN = ["run", "--dataset", "digits", "--models", "vae", "--param", "vae.latent_dim=2", "--param", "vae.hidden=16",
       "--epochs", "1", "--attacks", "max_damage", "--no-progress", "--estimators", "margin",
       "--param", "margin.samples_initial=64", "--param", "margin.samples_max=256", "--param", "margin.tolerance=0.5",
       "--param", "margin.max_radius=4.0", "--param", "margin.keep_adversarial=false"]


@pytest.fixture
def compiled():
    if not kernels.load():
        pytest.skip(f"the compiled extension does not load here: {kernels.build_error()}")


@pytest.fixture
def no_extension(monkeypatch):
    """What a machine without a compiler sees: the extension fails to load (the state kernels.load keeps)."""
    def off():
        monkeypatch.setitem(kernels._STATE, "loaded", False)
        monkeypatch.setitem(kernels._STATE, "error", "RuntimeError: no C++ compiler/ninja found")
        monkeypatch.setitem(kernels._STATE, "warned", True)
    return off


def _stored(out: Path) -> list[dict | None]:
    """Every stored row's ran_with, in write order."""
    store = ResultStore.open_existing(out)
    try:
        return [r.ran_with for r in store.rows()]
    finally:
        store.close()


def _invocations(out: Path) -> int:
    with sqlite3.connect(out / "results.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM provenance").fetchone()[0]


def test_rows_record_what_ran_and_a_resume_without_the_extension_is_refused(tmp_path, compiled, no_extension,
                                                                            capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--points", "2", "--out", str(out)]) == 0
    assert _stored(out) == [COMPILED, COMPILED]
    no_extension()  # the same run directory resumed where the extension does not load
    capsys.readouterr()
    assert main([*RUN, "--points", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 stored rows ran the compiled attack engine" in err and "no C++ compiler" in err, err
    assert "max_damage.engine=torch" in err
    assert len(_stored(out)) == 2 and _invocations(out) == 1  # refused before it recorded or computed anything
    # an explicit engine is a job key of its own: it runs, on torch, and says so
    assert main([*RUN, "--points", "3", "--out", str(out), "--param", "max_damage.engine=torch"]) == 0
    assert sorted(map(str, _stored(out))) == sorted(map(str, [COMPILED] * 2 + [FALLBACK] * 3))
    assert main(["report", str(out)]) == 0
    text = (out / "report" / "report.md").read_text()
    cells = [line for line in text.splitlines() if line.startswith(f"| {out} | 20")]
    assert [c.split(" | ")[-3] for c in cells] == ["compiled; cpp", "torch; torch"], cells


def test_a_resume_that_would_turn_torch_rows_compiled_is_refused_before_the_batch_is_stored(tmp_path, compiled,
                                                                                          no_extension, capsys):
    out = tmp_path / "run"
    no_extension()
    assert main([*RUN, "--points", "2", "--out", str(out)]) == 0
    assert _stored(out) == [FALLBACK, FALLBACK]
    kernels._STATE.update(loaded=True, error=None)  # the extension loads again (monkeypatch restores it after)
    capsys.readouterr()
    assert main([*RUN, "--points", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 stored rows ran the torch attack engine, this invocation runs compiled" in err, err
    assert len(_stored(out)) == 2
    # rows stored before engines were recorded cannot be compared: the resume goes on, and the report says so
    with sqlite3.connect(out / "results.sqlite") as db:
        db.execute("UPDATE results SET ran_with = NULL")
    assert main([*RUN, "--points", "3", "--out", str(out)]) == 0
    assert sorted(map(str, _stored(out))) == sorted(map(str, [None, None, COMPILED]))
    assert main(["report", str(out)]) == 0
    assert "not recorded (2 rows)" in (out / "report" / "report.md").read_text()


def test_reading_a_store_older_than_the_provenance_table(tmp_path):
    """A store written before provenance records existed (its results table has every other column): the
    report crashed ("no such table: provenance") once it showed provenance, and the leaderboard of such a
    directory did too."""
    from robbench.paper.report import write_report
    from robbench.store import RunRecord

    store = ResultStore(tmp_path)
    store.write([ResultRow("j", p, "vae", 0, "", "min_r", "ok", {"min_r": 1.0 + p}, None, 0.1) for p in range(3)])
    store.record_run(RunRecord({"models": ["vae"], "estimators": ["min_r"], "points": 3, "r": 4.0, "m": 0.5},
                               ["j"], [], []))
    store.close()
    with sqlite3.connect(tmp_path / ResultStore.FILENAME) as db:
        db.execute("DROP TABLE provenance")
    assert "robbench report" in write_report(tmp_path).read_text()
    assert main(["leaderboard", str(tmp_path)]) == 0


def test_a_store_that_cannot_be_migrated_is_still_read(tmp_path, monkeypatch):
    """An older store in a read-only place (an archive) lacks the ran_with column and cannot gain it: it is
    read as it is, ran_with None."""
    with sqlite3.connect(tmp_path / ResultStore.FILENAME) as db:
        db.executescript("""
CREATE TABLE results (job_key TEXT NOT NULL, point_id INTEGER NOT NULL, model TEXT NOT NULL,
    model_seed INTEGER NOT NULL, attack TEXT NOT NULL, estimator TEXT NOT NULL, status TEXT NOT NULL,
    metrics TEXT NOT NULL, error TEXT, seconds REAL NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (job_key, point_id));
INSERT INTO results VALUES ('j', 3, 'vae', 0, '', 'min_r', 'ok', '{"min_r": 1.5}', NULL, 0.2, 0.0);""")

    def read_only(self):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(ResultStore, "_migrate", read_only)
    store = ResultStore.open_existing(tmp_path)
    (row,) = store.rows()
    assert row.metrics == {"min_r": 1.5} and row.ran_with is None and row.model_family is None
    assert store.ran_with_history() == []
