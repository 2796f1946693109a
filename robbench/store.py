"""The results database: one SQLite file per run directory, written as results are produced.

Each row is one (job, point) result, where a job is a (model configuration + seed, attack, estimator)
triple identified by a hash of everything that determines its numbers. Beside the display labels a row
keeps the model family, its parameters and the attack's name and parameters as JSON, so readers never
parse labels. A rerun skips the rows that are already ``ok``; rows with ``error`` are retried. Every
write is its own committed transaction, so a run killed half-way keeps everything it reported.
Stores written before a column existed are migrated in place on open (the new columns are NULL there).
"""
from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    job_key     TEXT NOT NULL,
    point_id    INTEGER NOT NULL,
    model       TEXT NOT NULL,     -- model configuration label, e.g. beta_vae(beta=1.0)
    model_seed  INTEGER NOT NULL,
    attack      TEXT NOT NULL,     -- attack label, '' for estimators that use no attack
    estimator   TEXT NOT NULL,
    status      TEXT NOT NULL,     -- 'ok' or 'error'
    metrics     TEXT NOT NULL,     -- JSON object of the estimator's numbers
    error       TEXT,
    seconds     REAL NOT NULL,     -- wall time attributed to this point
    created     REAL NOT NULL,
    model_family  TEXT,            -- e.g. beta_vae (NULL in stores written before it was kept)
    model_params  TEXT,            -- JSON of the family's parameters for this configuration
    attack_name   TEXT,            -- registered attack name, NULL for estimators that use no attack
    attack_params TEXT,            -- JSON of the attack's parameters
    ran_with      TEXT,            -- JSON: the attack engine / Monte Carlo backend that ran (robbench.ran_with)
    PRIMARY KEY (job_key, point_id)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_key     TEXT PRIMARY KEY,
    estimator   TEXT NOT NULL,
    params      TEXT NOT NULL,     -- JSON: the estimator's merged parameters (defaults included)
    run         TEXT NOT NULL      -- JSON: the run-wide settings (r, m, confidence, backend, seed, device)
);
CREATE TABLE IF NOT EXISTS columns (
    estimator   TEXT PRIMARY KEY,
    columns     TEXT NOT NULL      -- JSON list of the estimator's leaderboard column declarations
);
CREATE TABLE IF NOT EXISTS models (
    model_key   TEXT PRIMARY KEY,  -- model label + seed + training setup
    model       TEXT NOT NULL,
    model_seed  INTEGER NOT NULL,
    info        TEXT NOT NULL      -- JSON: test ELBO, training seconds, cache key, or the error
);
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    started     REAL NOT NULL,
    config      TEXT NOT NULL,     -- JSON of the RunConfig
    jobs        TEXT NOT NULL,     -- JSON list of the job keys this configuration defines
    model_keys  TEXT NOT NULL,     -- JSON list of the models (model_key) it evaluates
    points      TEXT NOT NULL      -- JSON list of the test-set indices it evaluates
);
CREATE TABLE IF NOT EXISTS provenance (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded    REAL NOT NULL,
    info        TEXT NOT NULL      -- JSON: comparability settings, models, environment (robbench.provenance)
);
"""


@dataclass
class RunRecord:
    """What one invocation asked for: its configuration, job keys, model keys and points."""

    config: dict[str, Any]
    jobs: list[str]
    model_keys: list[str]
    points: list[int]


# Columns added to ``results`` after its first release, with their SQL types (migrated on open).
_ADDED_COLUMNS = {"model_family": "TEXT", "model_params": "TEXT", "attack_name": "TEXT", "attack_params": "TEXT",
                  "ran_with": "TEXT"}
_RESULT_FIELDS = ("job_key, point_id, model, model_seed, attack, estimator, status, metrics, error, seconds, "
                  "model_family, model_params, attack_name, attack_params, ran_with")


@dataclass
class ResultRow:
    """One (job, point) result. ``model`` / ``attack`` are display labels; ``model_family``,
    ``model_params``, ``attack_name`` and ``attack_params`` what they were made from (None when a row
    comes from a store older than these fields)."""

    job_key: str
    point_id: int
    model: str
    model_seed: int
    attack: str
    estimator: str
    status: str
    metrics: dict[str, Any]
    error: str | None
    seconds: float
    model_family: str | None = None
    model_params: dict[str, Any] | None = None
    attack_name: str | None = None
    attack_params: dict[str, Any] | None = None
    # the resolved attack engine / Monte Carlo backend, e.g. {"attack_engine": "compiled", "mc_backend": "cpp"}
    # (robbench.ran_with); None for error rows and rows stored before it was recorded
    ran_with: dict[str, str] | None = None


# Written into the SQLite header of every store robbench creates ("RBNC"); a store from before it was
# introduced is recognised by its tables.
APPLICATION_ID = 0x52424E43
TABLES = {"results", "jobs", "columns", "models", "runs"}
RESULT_COLUMNS = ["job_key", "point_id", "model", "model_seed", "attack", "estimator", "status", "metrics",
                  "error", "seconds", "created"]  # the first columns of every version's results table


class StoreError(Exception):
    """A results file robbench must not use: not SQLite, corrupt, or another program's database."""


def check_store_file(path: Path) -> None:
    """Raise :class:`StoreError` unless ``path`` is absent, empty, or a store robbench created.
    Reads only: a database robbench did not create is never written to."""
    path = Path(path)
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return
    if not path.is_file():
        raise StoreError(f"{path} is not a file, so it is not a robbench results store")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = [row[1] for row in conn.execute("PRAGMA table_info(results)")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path} is not a robbench results store: it cannot be read as SQLite ({err}); "
                         "it is corrupt or another program's file") from None
    if app_id == APPLICATION_ID:
        return
    foreign = sorted(tables - TABLES - {"sqlite_sequence"})
    later = columns[len(RESULT_COLUMNS):]
    if app_id != 0 or foreign or columns[:len(RESULT_COLUMNS)] != RESULT_COLUMNS or \
            any(c not in _ADDED_COLUMNS for c in later):
        what = f"application id {app_id:#x}" if app_id else \
            f"tables {', '.join(sorted(tables)) or '(none)'}"
        raise StoreError(f"{path} is not a robbench store ({what}); robbench never writes to a database "
                         "it did not create: move it away or choose another run directory")


class ResultStore:
    """A thin, typed layer over the run's SQLite database.

    Opening checks the file first (:func:`check_store_file`): another program's database is refused,
    never modified. ``read_only`` stores (leaderboard, report) do not create tables or write anything.
    """

    FILENAME = "results.sqlite"

    def __init__(self, run_dir: Path, *, read_only: bool = False):
        self.path = Path(run_dir) / self.FILENAME
        self.read_only = read_only
        check_store_file(self.path)
        try:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) if read_only else None
            if self._conn is None or self._lacks_columns():  # an older robbench store is migrated once
                if self._conn is not None:
                    self._conn.close()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._conn = sqlite3.connect(self.path)
                    self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self._conn.executescript(SCHEMA)
                    self._migrate()
                    self._conn.commit()
                except sqlite3.OperationalError:
                    if not read_only:
                        raise
                    # a read-only file or folder (an archived run): read it as it is, the columns it lacks
                    # read as NULL (see _fields), as before a column was added
                    self._conn.close()
                    self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            self._have = {row[1] for row in self._conn.execute("PRAGMA table_info(results)")}
            self.tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} cannot be used: {err} (corrupt?)") from None

    def _lacks_columns(self) -> bool:
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(results)")}
        return any(name not in have for name in _ADDED_COLUMNS)

    def _migrate(self) -> None:
        """Add the columns older stores lack (their rows keep NULL there)."""
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(results)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                self._conn.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")

    @classmethod
    def open_existing(cls, run_dir: Path) -> "ResultStore":
        """The store of an existing run directory, read-only."""
        if not (Path(run_dir) / cls.FILENAME).exists():
            raise FileNotFoundError(f"{run_dir} holds no {cls.FILENAME}: is it a robbench run directory?")
        return cls(run_dir, read_only=True)

    @property
    def missing_tables(self) -> set[str]:
        """Tables a robbench store should hold but this one does not (e.g. a lost ``models`` table)."""
        return TABLES - self.tables

    def close(self) -> None:
        self._conn.close()

    # --- writing -------------------------------------------------------------------------------
    def record_run(self, run: RunRecord) -> None:
        with self._conn:
            self._conn.execute("INSERT INTO runs (started, config, jobs, model_keys, points) VALUES (?, ?, ?, ?, ?)",
                               (time.time(), json.dumps(run.config, default=str), json.dumps(run.jobs),
                                json.dumps(run.model_keys), json.dumps(run.points)))

    def record_provenance(self, info: dict[str, Any]) -> None:
        """Store what an invocation ran with (see :mod:`robbench.provenance`)."""
        with self._conn:
            self._conn.execute("INSERT INTO provenance (recorded, info) VALUES (?, ?)",
                               (time.time(), json.dumps(info, default=str)))

    def provenance(self) -> dict[str, Any] | None:
        """The latest provenance record, or None for a run directory written before they existed."""
        if "provenance" not in self.tables:  # a store older than the table, opened read-only
            return None
        row = self._conn.execute("SELECT info FROM provenance ORDER BY id DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None

    def _invocations(self) -> list[tuple[float, float, str]]:
        """(start, end, provenance JSON) per invocation, oldest first: the rows it wrote were created in
        [start, end), end the next record's time (inf for the last); [] for a store older than the table."""
        if "provenance" not in self.tables:  # a store older than the table, opened read-only
            return []
        records = self._conn.execute("SELECT recorded, info FROM provenance ORDER BY id").fetchall()
        ends = [recorded for recorded, _ in records[1:]] + [float("inf")]
        return [(recorded, end, info) for (recorded, info), end in zip(records, ends)]

    def provenance_history(self) -> list[tuple[float, dict[str, Any], int]]:
        """Every invocation's provenance record, oldest first: (recorded, unix seconds; the record; how many of
        the stored result rows it wrote, i.e. were created before the next record). What those rows ran
        with: :meth:`ran_with_history`."""
        out = []
        for start, until, info in self._invocations():
            (count,) = self._conn.execute("SELECT COUNT(*) FROM results WHERE created >= ? AND created < ?",
                                          (start, until)).fetchone()
            out.append((float(start), json.loads(info), int(count)))
        return out

    def ran_with_history(self) -> list[dict[str, dict[str, int]]]:
        """Per provenance record (as :meth:`provenance_history`): of the stored rows that invocation wrote,
        kind -> {what ran -> rows}, e.g. {"attack_engine": {"compiled": 8}, "mc_backend": {"cpp": 16}}
        (:mod:`robbench.ran_with`; "unrecorded" for ok rows stored before it was recorded)."""
        ran = "ran_with" if "ran_with" in self._have else "NULL"
        out = []
        for start, until, _ in self._invocations():
            tally: dict[str, dict[str, int]] = {}
            for text, count in self._conn.execute(
                    f"SELECT {ran}, COUNT(*) FROM results WHERE status = 'ok' AND created >= ? AND created < ? "
                    f"GROUP BY {ran}", (start, until)):
                for kind, name in (json.loads(text) if text else {"": "unrecorded"}).items():
                    tally.setdefault(kind, {})
                    tally[kind][name] = tally[kind].get(name, 0) + count
            out.append(tally)
        return out

    def record_model(self, model_key: str, model: str, model_seed: int, info: dict[str, Any]) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?)",
                               (model_key, model, model_seed, json.dumps(info, default=str)))

    def record_jobs(self, jobs: Iterable[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> None:
        """Keep each job's (key, estimator, merged parameters, run settings): what its numbers mean,
        readable without the plugin that made them."""
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)",
                                   [(key, est, _json_or_null(params), _json_or_null(run))
                                    for key, est, params, run in jobs])

    def job_params(self) -> dict[str, dict[str, Any]]:
        """Job key -> {"estimator", "params", "run"} for the jobs recorded (none in older stores)."""
        cur = self._conn.execute("SELECT job_key, estimator, params, run FROM jobs")
        return {key: {"estimator": est, "params": json.loads(params), "run": json.loads(run)}
                for key, est, params, run in cur}

    def record_columns(self, estimator: str, columns: list[dict[str, Any]]) -> None:
        """Keep an estimator's leaderboard column declarations (``MetricColumn.to_dict()``), so the
        leaderboard of this directory can be rebuilt without the plugin installed."""
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO columns VALUES (?, ?)", (estimator, json.dumps(columns)))

    def write(self, rows: Iterable[ResultRow]) -> None:
        """Insert or replace rows in one committed transaction."""
        now = time.time()
        with self._conn:
            self._conn.executemany(
                f"INSERT OR REPLACE INTO results ({_RESULT_FIELDS}, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.job_key, r.point_id, r.model, r.model_seed, r.attack, r.estimator, r.status,
                  json.dumps(_json_safe(r.metrics), default=_plain), r.error, r.seconds, r.model_family,
                  _json_or_null(r.model_params), r.attack_name, _json_or_null(r.attack_params),
                  _json_or_null(r.ran_with), now)
                 for r in rows])

    # --- reading -------------------------------------------------------------------------------
    def done_points(self, job_key: str) -> set[int]:
        cur = self._conn.execute("SELECT point_id FROM results WHERE job_key = ? AND status = 'ok'", (job_key,))
        return {row[0] for row in cur}

    def _fields(self) -> str:
        """_RESULT_FIELDS, with NULL for a column this (read-only, unmigrated) store lacks."""
        return ", ".join(name if name in self._have or name not in _ADDED_COLUMNS else f"NULL AS {name}"
                         for name in (f.strip() for f in _RESULT_FIELDS.split(",")))

    def rows(self, job_keys: Iterable[str] | None = None) -> list[ResultRow]:
        fields = self._fields()
        if job_keys is None:
            cur = self._conn.execute(f"SELECT {fields} FROM results ORDER BY rowid")
            raw = cur.fetchall()
        else:
            keys = list(job_keys)
            raw = []
            for start in range(0, len(keys), 500):  # SQLite caps the number of bound variables
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                raw += self._conn.execute(
                    f"SELECT {fields} FROM results WHERE job_key IN ({marks}) ORDER BY rowid",
                    chunk).fetchall()
        return [ResultRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9], r[10],
                          _loads_or_none(r[11]), r[12], _loads_or_none(r[13]), _loads_or_none(r[14])) for r in raw]

    def columns(self) -> dict[str, list[Any]]:
        """Estimator -> its recorded leaderboard columns (as ``MetricColumn`` objects)."""
        from robbench.protocols import MetricColumn

        cur = self._conn.execute("SELECT estimator, columns FROM columns")
        return {name: [MetricColumn.from_dict(c) for c in json.loads(text)] for name, text in cur}

    def models(self) -> dict[str, dict[str, Any]]:
        if "models" not in self.tables:
            return {}
        cur = self._conn.execute("SELECT model_key, model, model_seed, info FROM models")
        return {key: {"model": label, "model_seed": seed, **json.loads(info)} for key, label, seed, info in cur}

    def runs(self) -> list[RunRecord]:
        """Every invocation recorded in this directory, oldest first."""
        if "runs" not in self.tables:
            return []
        cur = self._conn.execute("SELECT config, jobs, model_keys, points FROM runs ORDER BY id")
        return [RunRecord(*(json.loads(field) for field in row)) for row in cur]

    def latest_run(self) -> RunRecord | None:
        runs = self.runs()
        return runs[-1] if runs else None


def _json_or_null(value: Any) -> str | None:
    return None if value is None else json.dumps(_json_safe(value), default=_plain, sort_keys=True)


def _loads_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, tensors: their Python value (a plugin's estimator may return them)."""
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    return str(value)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become strings so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
