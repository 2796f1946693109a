"""RobustBench-style result entries: ``robbench export`` and ``robbench leaderboard --merge``.

An entry describes one model configuration of one run: its label, family and parameters, the
comparability settings (:data:`robbench.provenance.COMPARABILITY_KEYS`), one leaderboard record per
attack, and the environment it ran in. :func:`validate_entry` checks the shape before an entry is
written or merged. Leaderboards merge only entries whose settings agree; otherwise
:class:`MergeError` names every setting that differs and where.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from robbench.atomic import replace_text
from robbench.provenance import COMPARABILITY_KEYS

ENTRY_FORMAT = "robbench-entry/1"

# key -> (allowed types, required)
_ENTRY_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "model": ((str,), True),
    "family": ((str, type(None)), True),
    "params": ((dict, type(None)), True),
    "settings": ((dict,), True),
    "results": ((list,), True),
    "environment": ((dict,), True),
    "run": ((dict, type(None)), False),
    "source": ((str,), False),
}


class EntryError(ValueError):
    """An entry that does not have the documented shape; the message names the field."""


class MergeError(ValueError):
    """Entries whose comparability settings differ; the message names each setting and its values."""


def validate_entry(entry: Any) -> dict[str, Any]:
    """Return ``entry`` if it is a valid entry, else raise :class:`EntryError` naming the problem."""
    if not isinstance(entry, dict):
        raise EntryError(f"an entry must be a JSON object, got {type(entry).__name__}")
    for key, (types, required) in _ENTRY_FIELDS.items():
        if key not in entry:
            if required:
                raise EntryError(f"entry {entry.get('model', '?')!r}: missing field {key!r}")
            continue
        if not isinstance(entry[key], types):
            raise EntryError(f"entry {entry.get('model', '?')!r}: field {key!r} must be "
                             f"{' or '.join(t.__name__ for t in types)}, got {type(entry[key]).__name__}")
    if entry["format"] != ENTRY_FORMAT:
        raise EntryError(f"entry {entry['model']!r}: format {entry['format']!r}, expected {ENTRY_FORMAT!r}")
    missing = [k for k in COMPARABILITY_KEYS if k not in entry["settings"]]
    if missing:
        raise EntryError(f"entry {entry['model']!r}: settings lack {', '.join(missing)}")
    for rec in entry["results"]:
        if not isinstance(rec, dict) or rec.get("model") != entry["model"] or "attack" not in rec:
            raise EntryError(f"entry {entry['model']!r}: every result must be a leaderboard record of that "
                             f"model with an 'attack'")
    return entry


def entries_from_run(run_dir: Path) -> list[dict[str, Any]]:
    """One validated entry per model configuration of the run directory's latest invocation."""
    from robbench.leaderboard import latest_board
    from robbench.store import ResultStore

    store = ResultStore.open_existing(run_dir)
    try:
        prov = store.provenance()
        if prov is None:
            raise EntryError(f"{run_dir} holds no provenance record (written by an older robbench); "
                             f"rerun it to record its settings")
        records = [_clean(rec) for rec in latest_board(store)[0]]
    finally:
        store.close()
    by_model: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_model.setdefault(rec["model"], []).append(rec)
    out = []
    for label, recs in by_model.items():
        model = prov.get("models", {}).get(label, {})
        out.append(validate_entry({"format": ENTRY_FORMAT, "model": label, "family": model.get("family"),
                                   "params": model.get("params"), "settings": prov["settings"],
                                   "results": recs, "environment": prov["environment"], "run": prov.get("run"),
                                   "source": str(run_dir)}))
    return out


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's entries as a JSON list to ``out`` (default RUN_DIR/entries.json; missing folders made)."""
    entries = entries_from_run(run_dir)
    path = Path(out) if out else Path(run_dir) / "entries.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(entries, indent=2, default=str) + "\n")  # a failed write keeps the old file
    return path


def load_entries(source: Path) -> list[dict[str, Any]]:
    """Entries of a run directory, or of a JSON file written by :func:`export_run`, validated."""
    source = Path(source)
    if source.is_dir():
        return entries_from_run(source)
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} is neither a run directory nor an entries file") from None
    except json.JSONDecodeError as err:
        raise EntryError(f"{source} is not valid JSON: {err}") from None
    entries = data if isinstance(data, list) else [data]
    for entry in entries:
        validate_entry(entry)
        entry.setdefault("source", str(source))
    return entries


def check_comparable(entries: list[dict[str, Any]]) -> None:
    """Raise :class:`MergeError` unless every entry has the first entry's comparability settings."""
    if not entries:
        return
    ref = entries[0]
    problems = []
    for key in COMPARABILITY_KEYS:
        values: dict[str, Any] = {}
        for entry in entries:
            value = entry["settings"].get(key)
            values.setdefault(_canonical(value), (value, entry.get("source", "?")))
        if len(values) > 1:
            (first, src0), (second, src1) = list(values.values())[:2]
            where = _first_difference(first, second)
            if where:  # name the nested setting (e.g. estimators.margin.versions.verify_algorithm), not a prefix
                path, a, b = where
                problems.append(f"{key}.{path} differs ({_short(a)} in {src0}; {_short(b)} in {src1})")
            else:
                shown = "; ".join(f"{_short(v)} in {src}" for v, src in values.values())
                problems.append(f"{key} differs ({shown})")
    if problems:
        raise MergeError(f"refusing to merge results that are not comparable: {' / '.join(problems)}. "
                         f"Compare only runs with the same {', '.join(COMPARABILITY_KEYS)} "
                         f"(the first entry is from {ref.get('source', '?')})")


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(dotted path, value in a, value in b) of the first differing entry of two mappings, or None when
    either is not a mapping (then the values are shown whole). A key missing on one side shows as None."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return None
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if _canonical(x) != _canonical(y):
            sub = f"{path}.{key}" if path else str(key)
            return _first_difference(x, y, sub) or (sub, x, y)
    return None


def _clean(value: Any) -> Any:
    """JSON-ready: NaN -> None, +/-infinity -> "inf"/"-inf" (as in leaderboard.json: an open interval end
    of censored margins, an unbounded bound; standard JSON has no infinity), tuples -> lists, other
    objects -> str."""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _canonical(value: Any) -> str:
    """``value`` as JSON text independent of dict order (what settings and results are compared by)."""
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any, limit: int = 120) -> str:
    text = _canonical(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number_back(key: str, value: Any) -> Any:
    """A record value read from JSON: "inf"/"-inf" (written by :func:`_clean`) back to floats."""
    if key not in ("model", "attack") and value in ("inf", "-inf"):
        return math.inf if value == "inf" else -math.inf
    return value


def _distinct(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` without repeats of the same results (a source given twice, or a run directory and its
    own export): the first is kept, and a :class:`~robbench.config.RepeatedValueWarning` names the rest.
    Equal model label and equal result records (means, counts, wall seconds, ...) mean the same stored rows."""
    import warnings

    from robbench.config import RepeatedValueWarning

    seen: dict[str, str] = {}
    kept = []
    for entry in entries:
        identity = _canonical([entry["model"], entry["results"], entry.get("run")])
        if identity in seen:
            warnings.warn(RepeatedValueWarning(
                f"{entry.get('source', '?')} holds the same results for {entry['model']!r} as {seen[identity]}; "
                "they count once"))
            continue
        seen[identity] = str(entry.get("source", "?"))
        kept.append(entry)
    return kept


def merge(sources: list[Path]) -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
    """Leaderboard records of every entry of ``sources`` (in leaderboard order), their display columns
    and the shared settings. A model label that occurs in several sources gets the source appended,
    so rows stay distinct."""
    from robbench.leaderboard import display_columns, registered_declarations, sort_records

    entries = _distinct([entry for source in sources for entry in load_entries(source)])
    check_comparable(entries)
    labels: dict[str, int] = {}
    for entry in entries:
        labels[entry["model"]] = labels.get(entry["model"], 0) + 1
    records = []
    for entry in entries:
        for rec in entry["results"]:
            rec = {k: _number_back(k, v) for k, v in rec.items()}
            if labels[entry["model"]] > 1:
                rec["model"] = f"{rec['model']} [{entry.get('source', '?')}]"
            records.append(rec)
    settings = entries[0]["settings"] if entries else {}
    declarations = registered_declarations(sorted(settings.get("estimators", {})))
    columns = display_columns(declarations, float(settings.get("confidence", 0.95)))
    return sort_records(records, declarations), columns, settings
