"""What every stage task shares: the store, the result it returns, its log, progress reporting
(the look-up / build / commit sequence itself is quantmill/tasks/stage.py)."""

from __future__ import annotations

import os
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from quantmill.tasks.store import Entry, Store


def store() -> Store:
    return Store()


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
