"""`quantmill serve`: the `quantize` (form) and `requantize` (cron) deployments from one process.

`prefect.serve` polls the server for runs of both deployments and runs them in subprocesses on
this machine: a single GPU box needs no work pool and no worker. Teams with several machines use
prefect.yaml with a work pool instead (README, "Team setup").
"""

from __future__ import annotations

import os
from typing import Any, Optional

import typer

from quantmill.core.errors import QuantmillError

# The flows (torch, prefect, mlflow) are imported inside serve() and the scan, as the CLI's other
# layers are (cli.py): `quantmill --help` imports this module.

# What both ways of deploying state: these deployments, and prefect.yaml, which cannot import them
# and repeats them (tests/test_deployment.py checks that it does). The forms' defaults and bounds
# are not here: both take them from the flows' signatures (quantmill/tasks/specs.py).
DEFAULT_CRON = "0 * * * *"  # hourly
GPU_LIMIT = "gpu"
TAGS = ["quantmill"]
DESCRIPTIONS = {
    "quantize": "Quantize a model with built-in or inline recipes, evaluate against the original, optionally register in MLflow. Fill in the form.",
    "requantize": "Scan the watch file's sources (checkpoint folders, hub branches, MLflow aliases); start a quantize run for each new (checkpoint, recipe).",
}
REQUANTIZE_CONCURRENCY = 1  # two scans at once could both start the same pair


def _fail(message: str) -> None:
    typer.echo(f"error: {message.splitlines()[0] if message else 'failed'}", err=True)
    raise typer.Exit(2)


def build_deployments(cron: str = DEFAULT_CRON, watch: Optional[str] = None, timezone: str = "UTC") -> list[Any]:
    """The two runner deployments; requantize is paused when there is no watch file to read."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType

    from quantmill.flows.quantize import quantize_flow
    from quantmill.flows.requantize import requantize_flow

    schedule = CronSchedule(cron=cron, timezone=timezone)  # raises ValueError on a bad cron line
    # MODULE_PATH: the runner imports quantmill.flows.quantize from the installed package, whatever the cwd.
    quantize = quantize_flow.to_deployment(
        name="quantize",
        description=DESCRIPTIONS["quantize"],
        tags=TAGS,
        enforce_parameter_schema=True,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    requantize = requantize_flow.to_deployment(
        name="requantize",
        description=DESCRIPTIONS["requantize"],
        tags=TAGS,
        schedules=[schedule],
        parameters={"watch": os.path.abspath(watch)} if watch else {},
        paused=watch is None,
        concurrency_limit=REQUANTIZE_CONCURRENCY,
        enforce_parameter_schema=True,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return [quantize, requantize]


def ensure_gpu_limit(slots: int) -> str:
    """Create the global concurrency limit `gpu` when missing (an existing one is left as set)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            return f"global concurrency limit {GPU_LIMIT!r}: {found.limit} slot(s) (existing)"
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
            return f"global concurrency limit {GPU_LIMIT!r}: {slots} slot(s) (created)"


def serve(
    cron: str = typer.Option(DEFAULT_CRON, "--cron", help="requantize schedule, a cron line (default hourly)"),
    watch: Optional[str] = typer.Option(None, "--watch", help="watch file (YAML) for requantize; without it the schedule is paused"),
    timezone: str = typer.Option("UTC", "--timezone", help="time zone of the cron line"),
    gpu_slots: int = typer.Option(1, "--gpu-slots", min=1, help="slots of the `gpu` concurrency limit, if it does not exist yet"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="most flow runs this process runs at once"),
) -> None:
    """Serve the quantize and requantize deployments from this process (Ctrl-C stops)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        if watch is not None:
            from quantmill.flows.requantize import load_watch

            load_watch(watch)
        deployments = build_deployments(cron, watch, timezone)
    except QuantmillError as err:
        _fail(str(err))
    except ValueError as err:  # pydantic: a bad cron line or time zone
        errors = getattr(err, "errors", None)
        _fail(f"--cron {cron!r} / --timezone {timezone!r}: {errors()[0]['msg'] if errors else err}")
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail("no Prefect server: start one (`prefect server start`) and set PREFECT_API_URL (see README, Team setup)")
    try:
        typer.echo(ensure_gpu_limit(gpu_slots))
    except Exception as err:  # server unreachable: say so in one line
        _fail(f"cannot reach the Prefect server at {PREFECT_API_URL.value()}: {err}")
    typer.echo(f"requantize: {'every ' + repr(cron) + ' (' + timezone + '), watch ' + os.path.abspath(watch) if watch else 'paused (no --watch file)'}")
    prefect_serve(*deployments, limit=limit)
