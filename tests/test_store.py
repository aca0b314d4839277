"""The stage store: content-addressed keys, atomic entries, and what a killed run leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmill.core.errors import DatasetError, QuantmillError
from quantmill.tasks import store as store_module
from quantmill.tasks.processes import pid_alive
from quantmill.tasks.store import MANIFEST, STAGE_VERSIONS, Store, StoreError, stage_key

STAGE = "collect_stats"
KEY = stage_key(STAGE, {"batch_size": 8}, {"model": "m" * 64, "calibration": "c" * 64})
OTHER_KEY = stage_key(STAGE, {"batch_size": 4}, {"model": "m" * 64, "calibration": "c" * 64})


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    root = tmp_path / "home"
    monkeypatch.setenv("QUANTMILL_HOME", str(root))
    return Store()


def _dead_pid() -> int:
    """The pid of a process that has already exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait() == 0
    return proc.pid


def _tmps(store: Store, stage: str = STAGE) -> list[Path]:
    return sorted((store.root / stage).glob(".tmp-*"))


# --------------------------------------------------------------------------- keys


def test_store_root_is_quantmill_home(store, tmp_path) -> None:
    assert store.root == tmp_path / "home"
    assert store.path(STAGE, KEY) == tmp_path / "home" / STAGE / KEY


def test_stage_key_is_a_sha256_independent_of_dict_order() -> None:
    a = stage_key(STAGE, {"batch_size": 8, "nbins": 4096}, {"model": "a", "calibration": "b"})
    b = stage_key(STAGE, {"nbins": 4096, "batch_size": 8}, {"calibration": "b", "model": "a"})
    assert a == b
    assert len(a) == 64 and int(a, 16) >= 0


def test_stage_key_changes_with_params_inputs_and_stage() -> None:
    base = stage_key(STAGE, {"batch_size": 8}, {"model": "a"})
    assert stage_key(STAGE, {"batch_size": 4}, {"model": "a"}) != base
    assert stage_key(STAGE, {"batch_size": 8, "extra": None}, {"model": "a"}) != base
    assert stage_key(STAGE, {"batch_size": 8}, {"model": "b"}) != base
    assert stage_key(STAGE, {"batch_size": 8}, {"model": "a", "calibration": "c"}) != base
    assert stage_key("quantize", {"batch_size": 8}, {"model": "a"}) != base


def test_no_inputs_and_empty_inputs_give_the_same_key() -> None:
    assert stage_key("resolve_model", {"source": "demo"}) == stage_key("resolve_model", {"source": "demo"}, {})


def test_bumping_a_stage_version_changes_its_keys_only(monkeypatch) -> None:
    before = stage_key(STAGE, {"batch_size": 8}, {"model": "a"})
    other_before = stage_key("quantize", {"recipe": "r"}, {"model": "a"})
    monkeypatch.setitem(STAGE_VERSIONS, STAGE, STAGE_VERSIONS[STAGE] + ".1")
    assert stage_key(STAGE, {"batch_size": 8}, {"model": "a"}) != before
    assert stage_key("quantize", {"recipe": "r"}, {"model": "a"}) == other_before


def test_bumping_a_method_version_changes_that_methods_quantize_keys_only(monkeypatch) -> None:
    from dataclasses import replace

    from quantmill.methods.recipe_files import load_recipe
    from quantmill.methods.registry import REGISTRY
    from quantmill.tasks.quantize import quantize_key

    gptq, rtn = load_recipe("w4a16-gptq"), load_recipe("w4a16-rtn")
    keys = lambda: (quantize_key("m", "c", "s", gptq), quantize_key("m", "c", "s", rtn))  # noqa: E731
    monkeypatch.setitem(REGISTRY, "gptq", replace(REGISTRY["gptq"], version=1))  # version 1 is implied: stores made before versions still match
    inputs = {"model": "m", "calibration": "c", "stats": "s"}
    assert quantize_key("m", "c", "s", gptq) == stage_key("quantize", {"recipe_hash": gptq.hash}, inputs)
    gptq_before, rtn_before = keys()
    monkeypatch.setitem(REGISTRY, "gptq", replace(REGISTRY["gptq"], version=2))
    gptq_after, rtn_after = keys()
    assert gptq_after != gptq_before and rtn_after == rtn_before


def test_every_stage_has_a_version() -> None:
    assert set(STAGE_VERSIONS) >= {"resolve_model", "capture_calibration", "collect_stats", "quantize", "evaluate"}


# --------------------------------------------------------------------------- entries


def test_build_and_commit_make_an_entry_whose_manifest_is_written_last(store) -> None:
    assert store.get(STAGE, KEY) is None
    with store.build(STAGE, KEY) as tmp:
        assert tmp.parent == store.root / STAGE and tmp.name.startswith(f".tmp-{KEY}-")
        (tmp / "stats.safetensors").write_bytes(b"payload")
        (tmp / "partial").mkdir()
        (tmp / "partial" / "block-0000.json").write_text("{}")
        assert store.get(STAGE, KEY) is None  # nothing visible before the commit
        entry = store.commit(tmp, STAGE, KEY, {"summary": {"modules": 3}})
    assert entry.path == store.path(STAGE, KEY)
    assert not tmp.exists() and _tmps(store) == []
    on_disk = json.loads((entry.path / MANIFEST).read_text())
    assert on_disk["stage"] == STAGE and on_disk["key"] == KEY and on_disk["summary"] == {"modules": 3}
    assert "created" in on_disk
    assert (entry.path / "stats.safetensors").read_bytes() == b"payload"
    assert not (entry.path / "partial").exists()  # per-layer scratch is not part of the entry
    got = store.get(STAGE, KEY)
    assert got is not None
    assert (got.stage, got.key, got.path) == (STAGE, KEY, entry.path)
    assert got.manifest == on_disk == entry.manifest


def test_a_folder_without_manifest_is_not_an_entry(store) -> None:
    folder = store.path(STAGE, KEY)
    folder.mkdir(parents=True)
    (folder / "stats.safetensors").write_bytes(b"half-written")
    assert store.get(STAGE, KEY) is None


def test_a_quantmill_error_inside_build_leaves_no_tmp_folder(store) -> None:
    with pytest.raises(DatasetError, match="too short"):
        with store.build(STAGE, KEY) as tmp:
            (tmp / "partial").mkdir()
            (tmp / "partial" / "block-0000.json").write_text("{}")
            raise DatasetError("text too short")
    assert not tmp.exists()
    assert _tmps(store) == []
    assert store.get(STAGE, KEY) is None


def test_another_error_inside_build_keeps_the_tmp_folder_for_a_resume(store) -> None:
    with pytest.raises(RuntimeError):
        with store.build(STAGE, KEY) as tmp:
            (tmp / "partial").mkdir()
            (tmp / "partial" / "block-0000.json").write_text("{}")
            raise RuntimeError("out of memory")
    assert (tmp / "partial" / "block-0000.json").is_file()
    assert store.get(STAGE, KEY) is None
    # The same process resumes from its own folder.
    with store.build(STAGE, KEY) as again:
        assert again == tmp
        assert (again / "partial" / "block-0000.json").read_text() == "{}"
        store.discard(again)


def test_quantmill_error_is_the_base_of_user_errors() -> None:
    assert issubclass(DatasetError, QuantmillError)


def test_stale_tmp_of_the_same_key_is_adopted_and_other_keys_partials_are_kept(store) -> None:
    """Issue 17, item 1: another key's build never deletes a killed run's partial results."""
    dead = _dead_pid()
    assert not pid_alive(dead)
    stage_dir = store.root / STAGE
    mine = stage_dir / f".tmp-{KEY}-{dead}"
    (mine / "partial").mkdir(parents=True)
    (mine / "partial" / "block-0000.safetensors").write_bytes(b"block 0")
    (mine / "partial" / "progress.json").write_text('{"done": 0}')
    theirs = stage_dir / f".tmp-{OTHER_KEY}-{dead}"
    (theirs / "partial").mkdir(parents=True)
    (theirs / "partial" / "progress.json").write_text('{"done": 5}')

    with store.build(STAGE, KEY) as tmp:
        assert tmp != mine
        assert (tmp / "partial" / "block-0000.safetensors").read_bytes() == b"block 0"
        assert json.loads((tmp / "partial" / "progress.json").read_text()) == {"done": 0}
        assert not mine.exists()
        assert (theirs / "partial" / "progress.json").read_text() == '{"done": 5}'
        store.commit(tmp, STAGE, KEY, {})
    assert _tmps(store) == [theirs]
    # ... until a run of its own key adopts it.
    with store.build(STAGE, OTHER_KEY) as tmp:
        assert json.loads((tmp / "partial" / "progress.json").read_text()) == {"done": 5}
        store.commit(tmp, STAGE, OTHER_KEY, {})
    assert _tmps(store) == []


def test_tmp_folder_of_a_live_process_is_left_alone(store) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stage_dir = store.root / STAGE
        same = stage_dir / f".tmp-{KEY}-{sleeper.pid}"
        other = stage_dir / f".tmp-{OTHER_KEY}-{sleeper.pid}"
        for folder in (same, other):
            (folder / "partial").mkdir(parents=True)
            (folder / "partial" / "progress.json").write_text('{"done": 1}')
        with store.build(STAGE, KEY) as tmp:
            assert tmp not in (same, other)
            assert not (tmp / "partial").exists()  # a live run's work is not taken over
            assert (same / "partial" / "progress.json").is_file()
            assert (other / "partial" / "progress.json").is_file()
            store.commit(tmp, STAGE, KEY, {})
        assert same.is_dir() and other.is_dir()
        assert store.get(STAGE, KEY) is not None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_folder_that_is_not_a_tmp_is_never_touched(store) -> None:
    stage_dir = store.root / STAGE
    odd = stage_dir / ".tmp-no-pid-here"
    odd.mkdir(parents=True)
    with store.build(STAGE, KEY) as tmp:
        store.commit(tmp, STAGE, KEY, {})
    assert odd.is_dir()


def test_commit_when_the_entry_exists_keeps_the_existing_one(store) -> None:
    with store.build(STAGE, KEY) as tmp:
        (tmp / "result.txt").write_text("first")
        store.commit(tmp, STAGE, KEY, {"run": 1})
    with store.build(STAGE, KEY) as tmp2:
        (tmp2 / "result.txt").write_text("second")
        store.commit(tmp2, STAGE, KEY, {"run": 2})
    assert not tmp2.exists() and _tmps(store) == []
    got = store.get(STAGE, KEY)
    assert got is not None
    assert got.manifest["run"] == 1
    assert (got.path / "result.txt").read_text() == "first"


def test_commit_when_the_entry_exists_returns_the_kept_manifest(store) -> None:
    with store.build(STAGE, KEY) as tmp:
        store.commit(tmp, STAGE, KEY, {"run": 1})
    with store.build(STAGE, KEY) as tmp2:
        entry = store.commit(tmp2, STAGE, KEY, {"run": 2})
    assert entry.manifest == store.get(STAGE, KEY).manifest


def test_commit_over_a_folder_without_manifest_makes_a_real_entry(store) -> None:
    leftover = store.path(STAGE, KEY)
    leftover.mkdir(parents=True)
    (leftover / "stats.safetensors").write_bytes(b"half-written")
    with store.build(STAGE, KEY) as tmp:
        (tmp / "stats.safetensors").write_bytes(b"complete")
        store.commit(tmp, STAGE, KEY, {"run": 1})
    got = store.get(STAGE, KEY)
    assert got is not None and got.manifest["run"] == 1
    assert (got.path / "stats.safetensors").read_bytes() == b"complete"


# --------------------------------------------------------------------------- issue 17: partials, races, leftovers

_RACE = r"""
import json, os, sys, time
from pathlib import Path
from quantmill.tasks.store import Store
stage, key, start, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
store = Store()
while time.time() < start:
    time.sleep(0.001)
with store.build(stage, key) as tmp:
    if mode == "adopt":
        print(json.dumps({"adopted": (tmp / "partial" / "progress.json").is_file()}), flush=True)
        time.sleep(1.0)  # stay alive: our folder must not be taken over meanwhile
        store.discard(tmp)
    else:
        (tmp / "result.txt").write_text(str(os.getpid()))
        entry = store.commit(tmp, stage, key, {"writer": os.getpid()})
        print(json.dumps({"writer": entry.manifest["writer"], "file": (entry.path / "result.txt").read_text()}), flush=True)
"""


def _race(store: Store, mode: str, n: int = 6) -> list[dict]:
    start = time.time() + 1.5
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, STAGE, KEY, str(start), mode], cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "QUANTMILL_HOME": str(store.root)}, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return [json.loads(o) for o in outs]


def test_two_processes_never_adopt_the_same_partial(store) -> None:
    killed = store.root / STAGE / f".tmp-{KEY}-{_dead_pid()}"
    (killed / "partial").mkdir(parents=True)
    (killed / "partial" / "progress.json").write_text('{"done": 2}')
    results = _race(store, "adopt")
    assert sum(r["adopted"] for r in results) == 1


def test_concurrent_commits_of_one_key_keep_exactly_one_entry_that_every_writer_returns(store) -> None:
    """Issue 17, item 9: a slower writer never removes the entry a faster one renamed into place."""
    results = _race(store, "commit", n=8)
    got = store.get(STAGE, KEY)
    assert got is not None
    winner = got.manifest["writer"]
    assert (got.path / "result.txt").read_text() == str(winner)
    assert all(r == {"writer": winner, "file": str(winner)} for r in results)
    assert _tmps(store) == [] and [p.name for p in (store.root / STAGE).iterdir()] == [KEY]


def test_a_foreign_error_in_a_stage_without_partial_results_leaves_nothing(store) -> None:
    """Issue 17, item 7: a full disk (any error that is not quantmill's own) must not stay full."""
    with pytest.raises(OSError, match="No space left"):
        with store.build(STAGE, KEY) as tmp:
            (tmp / "checkpoint").mkdir()
            (tmp / "checkpoint" / "model.safetensors").write_bytes(b"x" * 1000)
            raise OSError(28, "No space left on device")
    assert _tmps(store) == [] and store.get(STAGE, KEY) is None


def test_a_foreign_error_in_a_resumable_stage_keeps_only_its_partial_results(store) -> None:
    with pytest.raises(MemoryError):
        with store.build(STAGE, KEY) as tmp:
            (tmp / "partial").mkdir()
            (tmp / "partial" / "progress.json").write_text('{"done": 3}')
            (tmp / "checkpoint").mkdir()
            (tmp / "checkpoint" / "model.safetensors").write_bytes(b"half")
            (tmp / "report.json").write_text("[]")
            raise MemoryError
    assert _tmps(store) == [tmp]
    assert sorted(p.name for p in tmp.iterdir()) == ["partial"]


def test_a_corrupt_manifest_is_an_error_naming_the_entry(store) -> None:
    folder = store.path(STAGE, KEY)
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text('{"stage": "collect_st')
    with pytest.raises(StoreError) as err:
        store.get(STAGE, KEY)
    assert str(err.value) == (
        f"store entry {STAGE}/{KEY[:12]} has a corrupt manifest.json (Unterminated string starting at: line 1 column 11 (char 10)): "
        f"delete {folder} and re-run"
    )


def _partial(store: Store, key: str, pid: int, age_s: float, blocks: int = 1) -> Path:
    folder = store.root / STAGE / f".tmp-{key}-{pid}"
    (folder / "partial").mkdir(parents=True)
    (folder / "partial" / "progress.json").write_text(json.dumps({"done": blocks - 1}))
    (folder / "partial" / "block-0000.safetensors").write_bytes(b"b" * 2000)
    old = time.time() - age_s
    for p in [folder, folder / "partial", *(folder / "partial").iterdir()]:
        os.utime(p, (old, old))
    return folder


def test_collect_removes_only_dead_owners_partials_older_than_the_age(store) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = _dead_pid()
        old_dead = _partial(store, KEY, dead, age_s=3 * 86400)
        young_dead = _partial(store, OTHER_KEY, dead, age_s=60)
        old_live = _partial(store, "a" * 64, sleeper.pid, age_s=3 * 86400)
        with store.build(STAGE, "e" * 64) as tmp:
            store.commit(tmp, STAGE, "e" * 64, {})
        removed = store.collect(older_than_s=86400)
        assert [p.path for p in removed] == [old_dead]
        assert not old_dead.exists() and young_dead.is_dir() and old_live.is_dir()
        assert store.get(STAGE, "e" * 64) is not None
        assert not list((store.root / STAGE).glob(".trash-*"))
    finally:
        sleeper.kill()
        sleeper.wait()


def _store_cli(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantmill.cli", "store", *args], cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "QUANTMILL_HOME": str(home), **env}, capture_output=True, text=True, timeout=120)


def test_store_ls_shows_entries_and_partials_with_ages_and_sizes(store) -> None:
    dead = _dead_pid()
    _partial(store, KEY, dead, age_s=2 * 3600, blocks=3)
    with store.build(STAGE, OTHER_KEY) as tmp:
        (tmp / "stats.safetensors").write_bytes(b"s" * 5000)
        store.commit(tmp, STAGE, OTHER_KEY, {})
    done = _store_cli(["ls"], store.root)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    partial = next(line for line in lines if "partial" in line)
    assert partial.split()[:5] == [STAGE, "partial", KEY[:16], "2.0h", "2.0"] and f"pid {dead} dead, 3 blocks done" in partial
    entry = next(line for line in lines if " entry " in line)
    assert entry.split()[:3] == [STAGE, "entry", OTHER_KEY[:16]] and "KB" in entry
    assert lines[-1] == f"1 entries, 1 partials in {store.root}"
    rows = json.loads(_store_cli(["ls", "--json"], store.root).stdout)["rows"]
    assert {(r["kind"], r["key"]) for r in rows} == {("partial", KEY), ("entry", OTHER_KEY)}


def test_store_gc_collects_old_dead_partials_with_a_configurable_default_age(store) -> None:
    dead = _dead_pid()
    old = _partial(store, KEY, dead, age_s=3 * 86400)
    young = _partial(store, OTHER_KEY, dead, age_s=2 * 3600)
    done = _store_cli(["gc"], store.root)  # default 7d: nothing that young
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "0 partials older than 7.0d removed"
    done = _store_cli(["gc", "--dry-run"], store.root, QUANTMILL_GC_OLDER_THAN="1d")
    assert done.stdout.splitlines()[-1] == "1 partials older than 1.0d would be removed" and old.is_dir()
    done = _store_cli(["gc"], store.root, QUANTMILL_GC_OLDER_THAN="1d")
    assert done.returncode == 0 and done.stdout.splitlines()[0].startswith(f"removed {STAGE}/{old.name} (")
    assert not old.exists() and young.is_dir()
    done = _store_cli(["gc", "--older-than", "1h"], store.root)
    assert done.stdout.splitlines()[-1] == "1 partials older than 1.0h removed" and not young.exists()


@pytest.mark.parametrize("args, env, message", [
    (["gc", "--older-than", "soon"], {}, "error: --older-than: 'soon' is not an age (a number with s, m, h, d or w, e.g. 7d)"),
    (["gc"], {"QUANTMILL_GC_OLDER_THAN": "-1d"}, "error: QUANTMILL_GC_OLDER_THAN: '-1d' is not an age (a number with s, m, h, d or w, e.g. 7d)"),
])
def test_store_gc_bad_age_is_a_one_line_error(store, args, env, message) -> None:
    done = _store_cli(args, store.root, **env)
    assert done.returncode == 2 and done.stderr.strip() == message and "Traceback" not in done.stderr


def test_commit_checks_and_renames_under_the_stage_lock(store) -> None:
    """The deterministic half of the race above: while another writer holds the stage lock (and
    renames its entry into place), a commit waits, then sees that entry and keeps it."""
    (store.root / STAGE).mkdir(parents=True)
    with store_module._stage_lock(store.root / STAGE):
        committer = subprocess.Popen(
            [sys.executable, "-c", _RACE, STAGE, KEY, "0", "commit"], cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "QUANTMILL_HOME": str(store.root)}, stdout=subprocess.PIPE, text=True,
        )
        deadline = time.time() + 30
        while not _tmps(store) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        assert committer.poll() is None and store.get(STAGE, KEY) is None  # waiting for the lock
        faster = store.root / STAGE / "faster"
        faster.mkdir()
        (faster / "result.txt").write_text("faster")
        (faster / MANIFEST).write_text(json.dumps({"stage": STAGE, "key": KEY, "writer": "faster"}))
        os.rename(faster, store.path(STAGE, KEY))
    out, _ = committer.communicate(timeout=60)
    assert json.loads(out) == {"writer": "faster", "file": "faster"}
    assert store.get(STAGE, KEY).manifest["writer"] == "faster" and _tmps(store) == []
