"""Merging leaderboards across robbench versions: the margin's verify=true rows of an earlier verification
algorithm (keyed apart in the store since session 8: key_versions) are not comparable with today's, so a
merge of the two is refused and names the algorithm version; verify=false rows (the unchanged estimator)
still merge. The same for the refinement rounds (refine > 0, refine_algorithm since session 9's review):
refine 0 rows (unchanged) still merge."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from robbench import cli
from robbench.entries import MergeError, check_comparable, entries_from_run, merge
from robbench.margin import REFINE_ALGORITHM, VERIFY_ALGORITHM
from robbench.plugins import get_registries


def _run(tmp_path, name: str, verify: bool, refine: int = 2):
    out = tmp_path / name
    assert cli.main(["run", "--dataset", "digits", "--models", "linear_gaussian", "--attacks", "noise",
                     "--estimators", "margin", "--param", f"margin.verify={str(verify).lower()}",
                     "--param", f"margin.refine={refine}",
                     "--param", "margin.samples_max=256", "--points", "2", "--backend", "torch",
                     "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def older_margin(monkeypatch):
    """While active, the registered margin estimator is the one of an earlier robbench: verification
    algorithm 1 (what a run folder made by that version records)."""
    regs = get_registries()
    current = regs.estimators.get("margin")
    older = dataclasses.replace(current, key_versions={**current.key_versions,
                                                       "verify": (True, {"verify_algorithm": 1})})
    items = regs.estimators._items  # the registry's table: swapped for this test only
    assert items["margin"] is current
    monkeypatch.setitem(items, "margin", older)
    return lambda: monkeypatch.setitem(items, "margin", current)


@pytest.mark.parametrize("verify", [True, False])
def test_merge_across_verification_algorithms(tmp_path, monkeypatch, older_margin, verify):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    old = _run(tmp_path, "old", verify)
    older_margin()  # back to today's estimator
    new = _run(tmp_path, "new", verify)
    if verify:
        named = rf"estimators\.margin\.versions\.verify_algorithm differs \(1 in .*old; {VERIFY_ALGORITHM} in .*new\)"
        with pytest.raises(MergeError, match=named):
            merge([old, new])
    else:
        records, _, _ = merge([old, new])
        assert len(records) == 2


@pytest.fixture
def unversioned_refine(monkeypatch):
    """While active, the registered margin estimator is the one of before session 9's review: refine > 0
    hashed no refinement version (what a run folder made by that version records)."""
    regs = get_registries()
    current = regs.estimators.get("margin")
    older = dataclasses.replace(current, key_versions={k: v for k, v in current.key_versions.items()
                                                       if k != "refine"})
    items = regs.estimators._items  # the registry's table: swapped for this test only
    assert items["margin"] is current
    monkeypatch.setitem(items, "margin", older)
    return lambda: monkeypatch.setitem(items, "margin", current)


@pytest.mark.parametrize("verify, refine", [(True, 2), (False, 2), (False, 1), (True, 0), (False, 0)])
def test_merge_across_refinement_algorithms(tmp_path, monkeypatch, unversioned_refine, verify, refine):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    old = _run(tmp_path, "old", verify, refine)
    unversioned_refine()  # back to today's estimator
    new = _run(tmp_path, "new", verify, refine)
    (entry,) = entries_from_run(new)
    versions = entry["settings"]["estimators"]["margin"].get("versions")
    if refine:
        assert versions["refine_algorithm"] == REFINE_ALGORITHM
        named = (r"estimators\.margin\.versions\.refine_algorithm differs \(null in .*old; "
                 rf"{REFINE_ALGORITHM} in .*new\)" if verify else
                 rf"estimators\.margin\.versions differs \(null in .*old; \{{\"refine_algorithm\": "
                 rf"{REFINE_ALGORITHM}\}} in .*new\)")
        with pytest.raises(MergeError, match=named):
            merge([old, new])
    else:  # refine 0 computes as before: same settings, the two merge
        assert "refine_algorithm" not in (versions or {})
        records, _, _ = merge([old, new])
        assert len(records) == 2


def test_entries_from_before_versions_were_recorded_do_not_merge_with_verified_margins(tmp_path, monkeypatch):
    """A session-7 entry (provenance without 'versions': its verify=true margins ran algorithm 1) against
    today's: refused, naming the missing version."""
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    new = _run(tmp_path, "new", True, refine=0)  # refine 0: no refinement version beside it
    (entry,) = entries_from_run(new)
    assert entry["settings"]["estimators"]["margin"]["versions"] == {"verify_algorithm": VERIFY_ALGORITHM}
    old = copy.deepcopy(entry)
    del old["settings"]["estimators"]["margin"]["versions"]
    old["source"] = "s7-folder"
    with pytest.raises(MergeError, match=r"estimators\.margin\.versions differs \(null in s7-folder; "
                                         rf"\{{\"verify_algorithm\": {VERIFY_ALGORITHM}\}} in "):
        check_comparable([old, entry])
