"""The one sequence every stage task runs, written once: key -> look up -> reuse, or else build in
the store's tmp folder -> commit with the manifest -> log -> the small result Prefect persists.

A stage task states only what is its own: a function from its parameters to a `Work` (its store
key and its build), decorated with `@stage(NAME)`. The decorator makes it a Prefect task whose
cache key is that same store key, so the store stays the source of truth and the key is computed
by one piece of code for both.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.context import TaskRunContext
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from quantmill.core.hashing import sha256_text
from quantmill.tasks.common import entry_result, log, store
from quantmill.tasks.store import Entry, Store


@dataclass(frozen=True)
class Built:
    """What a build hands back: the manifest to commit, and the line to log once it is committed."""

    manifest: dict[str, Any]
    message: str


@dataclass(frozen=True)
class Refresh:
    """Bringing an entry made by older code up to date in place, when it is reused (derived files
    only, each renamed into place). `stale` says whether it is needed (Prefect's cached record is
    then dropped, so the task runs); `apply` does it and returns the line to log."""

    stale: Callable[[Entry], bool]
    apply: Callable[[Entry], str]


@dataclass(frozen=True)
class Work:
    """One call of a stage task: its store key, how to fill the tmp folder (`build`), what the
    "reused" log line names, and an optional refresh of an older entry."""

    key: str
    build: Callable[[Path], Built]
    label: str = ""
    refresh: Refresh | None = None


def exclusive(s: Store, stage: str, key: str) -> AbstractContextManager[Any]:
    """The right to build (stage, key): the one place a build lock is taken. Two runs that need
    the same entry at the same time (on this host, or on two hosts sharing an s3:// store) build
    it once: the other waits, logging why, then reuses it; a holder killed mid-build releases it
    (at once on this host, after the lease across hosts) and the waiter builds, adopting the
    killed run's partial results (quantmill/tasks/store.py, lease.py)."""
    return s.exclusive(stage, key, on_wait=log)


def _reuse(stage: str, work: Work, entry: Entry) -> Entry:
    log(f"reused {stage} key {work.key[:12]}" + (f" ({work.label})" if work.label else ""))
    if work.refresh is not None and work.refresh.stale(entry):
        log(work.refresh.apply(entry))
    return entry


def run_stage(stage: str, work: Work) -> tuple[Entry, bool]:
    """(entry, reused): the stored entry of `work.key`, built and committed first when missing."""
    s = store()
    found = s.get(stage, work.key)
    if found is not None:
        return _reuse(stage, work, found), True
    with exclusive(s, stage, work.key):
        found = s.get(stage, work.key)  # a run that held the lock before this one may have built it
        if found is not None:
            return _reuse(stage, work, found), True
        with s.build(stage, work.key) as tmp:
            built = work.build(tmp)
            entry = s.commit(tmp, stage, work.key, built.manifest)
    log(built.message)
    return entry, False


def store_cache_key(stage: str, plan: Callable[..., Work]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A Prefect cache key that is the stage's store key, with the store as the source of truth:
    when the entry is gone (deleted by hand) or stale, Prefect's cached record of it is forgotten
    too, so the task runs again instead of returning a manifest that points nowhere."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        work = plan(**parameters)
        s = store()
        key = f"{stage}-{work.key}-{sha256_text(str(s.root.resolve()))[:8]}"
        found = s.get(stage, work.key)
        if found is None or (work.refresh is not None and work.refresh.stale(found)):
            (Path(PREFECT_LOCAL_STORAGE_PATH.value()) / key).unlink(missing_ok=True)
        return key

    return cache_key


def stage(name: str) -> Callable[[Callable[..., Work]], Task[..., dict[str, Any]]]:
    """`@stage(NAME)` on `plan(parameters) -> Work`: the Prefect task NAME, with the same
    parameters, returning `entry_result` (stage, key, path, reused, manifest)."""

    def decorate(plan: Callable[..., Work]) -> Task[..., dict[str, Any]]:
        @functools.wraps(plan)
        def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
            entry, reused = run_stage(name, plan(*args, **kwargs))
            return entry_result(entry, reused)

        run.__signature__ = inspect.signature(plan).replace(return_annotation="dict[str, Any]")  # type: ignore[attr-defined]
        return task(name=name, cache_key_fn=store_cache_key(name, plan), persist_result=True)(run)

    return decorate
