"""The results store: family, parameters and attack parameters kept as JSON beside the labels, column
declarations kept for the leaderboard, and stores written before those fields migrated on open."""
from __future__ import annotations

import json
import sqlite3

from robbench.protocols import MetricColumn
from robbench.store import ResultRow, ResultStore

OLD_SCHEMA = """
CREATE TABLE results (job_key TEXT NOT NULL, point_id INTEGER NOT NULL, model TEXT NOT NULL,
    model_seed INTEGER NOT NULL, attack TEXT NOT NULL, estimator TEXT NOT NULL, status TEXT NOT NULL,
    metrics TEXT NOT NULL, error TEXT, seconds REAL NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (job_key, point_id));
INSERT INTO results VALUES ('j', 3, 'beta_vae(beta=1.0)', 0, 'max_damage', 'margin', 'ok', '{"margin": 1.5}',
    NULL, 0.2, 0.0);
"""


def test_family_and_parameters_round_trip(tmp_path):
    store = ResultStore(tmp_path)
    store.write([ResultRow("j", 0, "beta_vae(beta=1.0)", 2, "max_damage(route=mu)", "margin", "ok", {"margin": 1.0},
                           None, 0.1, "beta_vae", {"beta": 1.0, "latent_dim": 10}, "max_damage", {"route": "mu"})])
    row = store.rows()[0]
    assert (row.model_family, row.model_params, row.attack_name, row.attack_params) == (
        "beta_vae", {"beta": 1.0, "latent_dim": 10}, "max_damage", {"route": "mu"})


def test_an_older_store_is_migrated_and_still_read(tmp_path):
    conn = sqlite3.connect(tmp_path / ResultStore.FILENAME)
    conn.executescript(OLD_SCHEMA)
    conn.commit()
    conn.close()
    store = ResultStore.open_existing(tmp_path)
    old = store.rows()[0]
    assert old.metrics == {"margin": 1.5} and old.model_family is None and old.attack_params is None
    store.write([ResultRow("k", 1, "vae", 0, "", "bound", "ok", {"bound": 0.1}, None, 0.1, "vae", {}, None, None)])
    assert [r.model_family for r in store.rows()] == [None, "vae"]


def test_column_declarations_are_kept(tmp_path):
    store = ResultStore(tmp_path)
    col = MetricColumn("speed_mean", "mean speed", "speed", "mean", "lower", ".1f", rank=True)
    store.record_columns("speed", [col.to_dict()])
    assert ResultStore.open_existing(tmp_path).columns() == {"speed": [col]}
    assert json.loads(sqlite3.connect(tmp_path / ResultStore.FILENAME).execute(
        "SELECT columns FROM columns").fetchone()[0])[0]["key"] == "speed_mean"
