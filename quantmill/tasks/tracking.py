"""Where MLflow is, and a client that fails fast: the one way every quantmill command and task
reaches the registry.

Tracking goes to $MLFLOW_TRACKING_URI when set, else a SQLite file and an artifact folder under
$QUANTMILL_HOME/mlflow, so no command needs the URI typed. A server that does not answer is
retried for at most `REACH_SECONDS`, then reported in one line naming the URI (MLflow's own
retries would take minutes).
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from quantmill.core.errors import QuantmillError, SourceError
from quantmill.tasks.store import default_root

EXPERIMENT = "quantmill"
REACH_SECONDS = 15.0
# MLflow's registered-model names as quantmill makes them: safe in a filter string and a path.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class RegistryError(QuantmillError):
    """The registry cannot be reached, or refuses what was asked of it."""


def mlflow_module():
    warnings.filterwarnings("ignore", message=".*noload.*")
    # Bounded HTTP retries for every later call (MLflow's defaults retry for minutes); a user's
    # own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow

    return mlflow


# mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment; URIs that quantmill
# chose itself must not then be mistaken for the user's choice (a later run with another
# QUANTMILL_HOME would log into the old home).
_DEFAULT_URIS: set[str] = set()
_REACHED: dict[str, float] = {}


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri not in _DEFAULT_URIS:
        return uri
    folder = default_root() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    default = f"sqlite:///{folder / 'mlflow.db'}"
    _DEFAULT_URIS.add(default)
    return default


def check_reachable(uri: str, seconds: float = REACH_SECONDS) -> None:
    """An http(s) tracking server answers /health within `seconds`, or a one-line RegistryError."""
    if not uri.startswith(("http://", "https://")):
        return
    if time.monotonic() - _REACHED.get(uri, -1e9) < 60:
        return
    deadline = time.monotonic() + seconds
    delay = 0.5
    last = ""
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status == 200:
                    _REACHED[uri] = time.monotonic()
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (OSError, ValueError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() + delay > deadline:
            raise RegistryError(f"MLflow tracking server {uri} is unreachable ({last})")
        time.sleep(delay)
        delay = min(delay * 2, 4.0)


def client():
    mlflow = mlflow_module()
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def experiment_id() -> str:
    c = client()
    found = c.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (default_root() / "mlflow" / "artifacts").resolve().as_uri()
    return c.create_experiment(EXPERIMENT, artifact_location=location)


def check_model_name(name: str) -> str:
    """A registered-model name quantmill may create (letters, digits, `.`, `_`, `-`)."""
    if not NAME_PATTERN.match(name or ""):
        raise RegistryError(f"registered model name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    return name


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri!r} is not a registry URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    body = uri[len("models:/") :]
    if "@" in body:
        name, alias = body.split("@", 1)
        if NAME_PATTERN.match(name) and re.match(r"^[A-Za-z0-9_-]+$", alias):
            return name, alias, None
    else:
        name, _, number = body.rpartition("/")
        if NAME_PATTERN.match(name) and number.isdigit():
            return name, None, number
    raise RegistryError(f"{uri!r} is not a registry URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def get_version(uri: str):
    """The ModelVersion a models:/ URI names; one line when the model, alias or version is unknown."""
    name, alias, number = parse_model_uri(uri)
    c = client()
    try:
        c.get_registered_model(name)
    except Exception as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err) or "not found" in str(err).lower():
            raise RegistryError(f"no registered model {name!r} at {tracking_uri()}") from None
        raise RegistryError(f"cannot read {name!r} from {tracking_uri()}: {str(err).splitlines()[0]}") from None
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, number)
    except Exception:
        what = f"alias {alias!r}" if alias else f"version {number}"
        raise RegistryError(f"registered model {name!r} has no {what}") from None


def resolve_model_uri(uri: str) -> tuple[str, str]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (models:/NAME/VERSION, its artifact source)."""
    try:
        version = get_version(uri)
    except RegistryError as err:
        raise SourceError(f"cannot resolve {uri}: {err}") from None
    return f"models:/{version.name}/{version.version}", version.source


def download_model(version_uri: str, dst: Path) -> Path:
    mlflow = mlflow_module()
    mlflow.set_tracking_uri(tracking_uri())
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version_uri, dst_path=str(dst)))
