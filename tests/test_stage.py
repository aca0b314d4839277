"""The stage decorator (quantmill/tasks/stage.py) on a real store and a real Prefect server: a
stage is built once and reused after, bad input commits nothing, a stale entry is refreshed in
place (Prefect runs the task again for it), and an entry deleted by hand is built again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefect import flow

from quantmill.core.errors import QuantmillError
from quantmill.tasks.stage import Built, Refresh, Work, stage
from quantmill.tasks.store import Entry, Store, stage_key

STAGE = "collect_stats"  # any stage the store knows; the builds below are the test's own


def counting_stage(builds: list[str]):
    """A stage task writing `value.txt` and a `marker` (the refreshable, derived file)."""

    def add_marker(entry: Entry) -> str:
        (entry.path / "marker").write_text("added")
        return f"added the marker to {entry.key[:12]}"

    @stage(STAGE)
    def write_value(value: str) -> Work:
        key = stage_key(STAGE, {"value": value})

        def build(tmp: Path) -> Built:
            if value == "bad":
                raise QuantmillError("value 'bad' is refused")
            builds.append(value)
            (tmp / "value.txt").write_text(value)
            (tmp / "marker").write_text("built")
            return Built({"value": value}, f"wrote {value} -> key {key[:12]}")

        return Work(key, build, label=value, refresh=Refresh(stale=lambda e: not (e.path / "marker").is_file(), apply=add_marker))

    return write_value


def test_a_stage_is_built_once_then_reused_and_bad_input_commits_nothing(home: Path):
    builds: list[str] = []
    task = counting_stage(builds)
    first = task.fn("a")
    assert not first["reused"] and first["stage"] == STAGE and first["manifest"]["value"] == "a"
    assert Path(first["path"], "value.txt").read_text() == "a"
    assert json.loads(Path(first["path"], "manifest.json").read_text())["key"] == first["key"]
    again = task.fn(value="a")
    assert again["reused"] and again["key"] == first["key"] and builds == ["a"]

    with pytest.raises(QuantmillError, match="value 'bad' is refused"):
        task.fn("bad")
    assert [p.name for p in (home / STAGE).iterdir()] == [first["key"]]  # no entry, no tmp folder
    assert Store(home).get(STAGE, stage_key(STAGE, {"value": "bad"})) is None


def test_prefect_caches_on_the_store_key_refreshes_stale_entries_and_rebuilds_deleted_ones(home: Path, prefect_api):
    builds: list[str] = []
    task = counting_stage(builds)

    @flow
    def twice() -> list[tuple[str, bool]]:
        states = [task("b", return_state=True) for _ in range(2)]
        return [(s.name, s.result()["reused"]) for s in states]

    assert twice() == [("Completed", False), ("Cached", False)]  # Prefect serves the first run's result
    entry = Store(home).get(STAGE, stage_key(STAGE, {"value": "b"}))
    assert entry is not None

    (entry.path / "marker").unlink()  # stale: Prefect's record is dropped, the task runs and refreshes
    assert twice() == [("Completed", True), ("Cached", True)]
    assert (entry.path / "marker").read_text() == "added" and builds == ["b"]

    shutil.rmtree(entry.path)  # deleted by hand: built again, not a cached result pointing nowhere
    assert twice() == [("Completed", False), ("Cached", False)]
    assert builds == ["b", "b"] and (entry.path / "value.txt").read_text() == "b"
