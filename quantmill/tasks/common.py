"""What every stage task shares: the store, Prefect caching on store keys, progress reporting."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from quantmill.core.hashing import sha256_text
from quantmill.tasks.store import Entry, Store


def store() -> Store:
    return Store()


def store_cache_key(key_of: Callable[[dict[str, Any]], tuple[str, str]]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A Prefect cache key that is the stage's store key, with the store as the source of truth:
    when the entry is gone (deleted by hand), Prefect's cached record of it is forgotten too, so the
    task runs again instead of returning a manifest that points nowhere."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        stage, key = key_of(parameters)
        s = store()
        cache_key = f"{stage}-{key}-{sha256_text(str(s.root.resolve()))[:8]}"
        if s.get(stage, key) is None:
            record = Path(PREFECT_LOCAL_STORAGE_PATH.value()) / cache_key
            record.unlink(missing_ok=True)
        return cache_key

    return cache_key


def entry_result(entry: Entry, reused: bool, **extra: Any) -> dict[str, Any]:
    """The small value a stage task returns (and Prefect persists): never tensors."""
    return {"stage": entry.stage, "key": entry.key, "path": str(entry.path), "reused": reused, "manifest": entry.manifest, **extra}


def log(message: str) -> None:
    try:
        get_run_logger().info(message)
    except Exception:  # outside a run (library use): there is no run log to write to
        pass


class Progress:
    """A Prefect progress artifact for one stage (visible in the UI while the stage runs)."""

    def __init__(self, description: str) -> None:
        self.id = None
        try:
            self.id = create_progress_artifact(progress=0.0, description=description)
        except Exception:  # no run context (called as a plain function): progress goes to tqdm only
            self.id = None

    def update(self, done: int, total: int, *_: Any) -> None:
        if self.id is not None:
            update_progress_artifact(self.id, progress=100.0 * done / max(total, 1))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
