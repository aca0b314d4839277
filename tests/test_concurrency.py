"""Issue 20: two runs that need the same stage at the same time compute it once (the store's build
lock, taken by the stage decorator), and a holder killed mid-stage does not block the other: the
waiter takes over at once on this host (the kernel drops a dead holder's flock) and adopts the
killed run's per-block results. Real CLI processes, a real Prefect server, one store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_cli import leftovers
from tests.tiny import make_tiny_llama

BUILT_STATS = "collected stats of"  # the stats stage's line once it has built its entry
WAITING = "waiting for the run that is building collect_stats"


@pytest.fixture
def cli_env(prefect_api, home: Path) -> dict[str, str]:
    return {"PREFECT_API_URL": prefect_api, "QUANTMILL_HOME": str(home)}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """Deep enough that the stats stage takes seconds: the two runs overlap inside it."""
    return make_tiny_llama(tmp_path_factory.mktemp("concurrency") / "deep", layers=8, hidden=128, intermediate=256)


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "quantmill.cli", *args], cwd=REPO, env={**os.environ, **env},
        stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while not predicate():
        ended = [p.args[-1] for p in procs if p.poll() is not None]
        if time.time() > deadline or ended:
            tails = "\n".join(f"--- {log.name}:\n{log.read_text()[-2000:]}" for log in logs)
            raise AssertionError(f"{'a run ended' if ended else 'timed out'} while waiting for {what}\n{tails}")
        time.sleep(0.1)


def _blocks_done_in(build: Path) -> int:
    """Decoder blocks finished in one stats build folder (the sequential engine's marker)."""
    try:
        return int(json.loads((build / "partial" / "progress.json").read_text())["done"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def _stats_blocks_done(home: Path) -> int:
    return max((_blocks_done_in(t) for t in (home / "collect_stats").glob(".tmp-*")), default=0)


def test_two_runs_started_together_collect_the_stats_once(cli_env, deep_model, tmp_path):
    args = ["quantize", "--model", str(deep_model), "--recipe", "w8a16-rtn", "--calib-samples", "32", "--seq-len", "128", "--eval-windows", "2"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(args, cli_env, log) for log in logs]
    try:
        for p in procs:
            assert p.wait(timeout=600) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    outputs = [log.read_text() for log in logs]
    built = [BUILT_STATS in out for out in outputs]
    assert built.count(True) == 1, "the stats stage must be built by exactly one of the two runs"
    other = outputs[built.index(False)]
    assert "reused collect_stats" in other or "collect_stats: cached" in other, other[-3000:]
    home = Path(cli_env["QUANTMILL_HOME"])
    assert len([p for p in (home / "collect_stats").iterdir() if (p / "manifest.json").is_file()]) == 1
    assert not leftovers(home)
    assert not [p for p in (home / ".locks").rglob("*") if p.is_file()]  # each holder removed its lock file


def test_a_holder_killed_mid_stage_does_not_block_the_waiting_run(cli_env, tmp_path):
    """A and B start together; one builds the stats, the other finds the build lock held and waits
    (it says so). The holder is SIGKILLed mid-walk; the waiter takes over at once, adopts the
    holder's finished blocks and completes."""
    layers = 16
    model = make_tiny_llama(tmp_path / "deeper", layers=layers, hidden=128, intermediate=256)
    # 256 x 256 calibration tokens over 16 blocks: the holder's walk outlasts the other run's start.
    args = ["quantize", "--model", str(model), "--recipe", "w8a16-rtn", "--calib-samples", "256", "--seq-len", "256", "--eval-windows", "2"]
    home = Path(cli_env["QUANTMILL_HOME"])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(args, cli_env, log) for log in logs]
    try:
        def one_waits_while_the_other_walks() -> bool:
            return any(WAITING in log.read_text() for log in logs) and _stats_blocks_done(home) >= 1

        _wait_for(one_waits_while_the_other_walks, 300, "one run to wait while the other walks the stats", procs, logs)
        w = next(i for i, log in enumerate(logs) if WAITING in log.read_text())
        waiter, holder, waiter_log = procs[w], procs[1 - w], logs[w]
        done_by_holder = _stats_blocks_done(home)
        at_kill = {t.name[-12:]: _blocks_done_in(t) for t in (home / "collect_stats").glob(".tmp-*")}
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        killed_at = time.monotonic()
        # The waiter's build folder is the holder's, renamed (adopted) once it holds the lock: it
        # must appear well within the lease (60 s); on one host the kernel frees a dead holder's
        # flock at once.
        mine = lambda: [t for t in (home / "collect_stats").glob(f".tmp-*-{waiter.pid}") if t.is_dir()]  # noqa: E731
        _wait_for(lambda: bool(mine()), 60, "the waiting run to take over the stats build", [waiter], logs)
        took_over_s = time.monotonic() - killed_at
        adopted = _blocks_done_in(mine()[0])
        assert waiter.wait(timeout=600) == 0, waiter_log.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"holder {holder.pid} killed after {done_by_holder} of {layers} blocks ({at_kill}); the waiter {waiter.pid} took over in {took_over_s:.2f} s with {adopted} blocks adopted")
    assert 1 <= done_by_holder < layers, f"the holder was killed after {done_by_holder} of {layers} blocks, not mid-walk"
    assert took_over_s < 30, took_over_s
    assert adopted >= done_by_holder  # resumed from the killed run's finished blocks, not from block 0
    assert BUILT_STATS in waiter_log.read_text()  # and finished the stats itself
    entries = [p for p in (home / "collect_stats").iterdir() if (p / "manifest.json").is_file()]
    assert len(entries) == 1 and not leftovers(home)


def test_an_exited_process_not_yet_reaped_owns_nothing():
    """A killed holder's lock is free while its pid lingers (exiting, or a zombie until its parent
    reaps it): a zombie does not count as a live owner of a partial."""
    import psutil

    from quantmill.tasks.processes import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)
