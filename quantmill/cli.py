"""`quantmill quantize ...` and `quantmill recipes`: parse, call the flow, print one table."""

from __future__ import annotations

from quantmill.core.threads import prefer_passive_waits

prefer_passive_waits()  # before torch is imported (quantmill/core/threads.py says why)

import json  # noqa: E402
import logging
import os
import sys
import time
import warnings
from typing import Any, Optional

import typer

from quantmill.console import fail
from quantmill.core.errors import QuantmillError
from quantmill.tasks.specs import DEFAULT_RECIPES, DEVICES, CalibrationSpec, EvaluationSpec

CALIBRATION, EVALUATION = CalibrationSpec(), EvaluationSpec()  # the options' defaults: the flow form's

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training quantization of causal LMs, as a cached pipeline.")


class _QuietConsole(logging.Filter):
    """Without --debug the CLI reports errors itself, on one line: drop tracebacks and error records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not record.exc_info


def _quiet_prefect_console() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in logging.root.manager.loggerDict]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_QuietConsole())


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _with_interval(row: dict[str, Any], key: str) -> str:
    """`value [low, high]`: the 95% interval paired over eval windows, when there are two or more."""
    low, high = row.get(f"{key}_ci95_low"), row.get(f"{key}_ci95_high")
    if low is None or high is None:
        return _fmt(row.get(key), ".4f")
    return f"{row[key]:.4f} [{low:.4f}, {high:.4f}]"


def results_table(summary: dict[str, Any]) -> str:
    fp = summary["reference"]
    header = ["recipe", "ppl", "ppl ratio [95% CI]", "KL [95% CI]", "top-1 agree", "size MB", "bits/w", "quant s", "eval s", "gate", "MLflow URI"]
    rows = [["float (reference)", _fmt(fp["ppl"], ".3f"), "1.0000", "-", "-", _fmt(fp["size_mb"], ".1f"), "32", "-", _fmt(fp["seconds"], ".1f"), "-", "-"]]
    for r in summary["rows"]:
        rows.append([
            r["recipe"], _fmt(r["ppl"], ".3f"), _with_interval(r, "ppl_ratio"), _with_interval(r, "kl"), _fmt(r["top1_agreement"], ".4f"),
            _fmt(r["size_mb"], ".1f"), _fmt(r["bits_per_weight"], ".2f"), _fmt(r["quantize_seconds"], ".1f"), _fmt(r["seconds"], ".1f"),
            r.get("gate") or "-", r.get("uri") or "-",
        ])
    failed = [f"{r['recipe']}: {r['gate_reasons']}" for r in summary["rows"] if r.get("gate") == "failed"]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if i == 0 or i == len(row) - 1 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    notes = [f"gate failed for {f} (registered without an alias)" for f in failed]
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows] + ([""] + notes if notes else []))


def _gate_option(max_ppl_ratio: float | None, max_kl: float | None, min_top1: float | None):
    """The --gate-* options as a QualityGate (None when none is given); bad limits name the option."""
    from pydantic import ValidationError

    from quantmill.methods.recipe import QualityGate

    if max_ppl_ratio is None and max_kl is None and min_top1 is None:
        return None
    try:
        return QualityGate(max_ppl_ratio=max_ppl_ratio, max_kl=max_kl, min_top1_agreement=min_top1)
    except ValidationError as err:
        first = err.errors()[0]
        option = {"max_ppl_ratio": "--gate-max-ppl-ratio", "max_kl": "--gate-max-kl", "min_top1_agreement": "--gate-min-top1"}[str(first["loc"][0])]
        raise QuantmillError(f"{option}: {first['msg']}") from None


PLOT_FORMATS = (".png", ".pdf", ".svg")


def _check_plot_path(plot: str) -> None:
    """--plot is written after all the work: a bad path is refused before it starts."""
    from pathlib import Path

    from quantmill.flows.params import check_writable_folder

    path = Path(plot)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise QuantmillError(f"--plot {plot}: use a {', '.join(PLOT_FORMATS)} file name")
    if path.is_dir():
        raise QuantmillError(f"--plot {plot}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise QuantmillError(f"--plot {plot}: folder {path.parent} does not exist")
    check_writable_folder(path.parent, "--plot folder")


@app.command()
def quantize(
    model: str = typer.Option("demo", "--model", "-m", help="demo | hf:ORG/NAME[@REV] | DIR | FILE.gguf | models:/NAME@ALIAS"),
    recipe: list[str] = typer.Option(None, "--recipe", "-r", help=f"built-in recipe name or YAML file (repeatable; default: {' '.join(DEFAULT_RECIPES)})"),
    calib: str = typer.Option(CALIBRATION.dataset, "--calib", help="calibration dataset spec"),
    calib_samples: int = typer.Option(CALIBRATION.samples, "--calib-samples", help="N calibration samples"),
    seq_len: int = typer.Option(CALIBRATION.seq_len, "--seq-len", help="L tokens per calibration sample and eval window"),
    seed: int = typer.Option(CALIBRATION.seed, "--seed"),
    eval_spec: str = typer.Option(EVALUATION.dataset, "--eval", help="evaluation dataset spec"),
    eval_windows: int = typer.Option(EVALUATION.windows, "--eval-windows", help="K evaluation windows"),
    register: Optional[str] = typer.Option(None, "--register", help="register results in MLflow under NAME-RECIPE"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="accept pickle (.bin) weights you trust"),
    device: Optional[str] = typer.Option(None, "--device", help=f"{' | '.join(DEVICES)} (default auto: cuda when present)"),
    gate_max_ppl_ratio: Optional[float] = typer.Option(None, "--gate-max-ppl-ratio", help="quality gate: highest ppl ratio (overrides the recipe's)"),
    gate_max_kl: Optional[float] = typer.Option(None, "--gate-max-kl", help="quality gate: highest KL to the float model"),
    gate_min_top1: Optional[float] = typer.Option(None, "--gate-min-top1", help="quality gate: lowest top-1 agreement"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
    plot: Optional[str] = typer.Option(None, "--plot", help="write a size-vs-perplexity PNG here"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Quantize MODEL with each RECIPE, evaluate against the original, optionally register."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    warnings.filterwarnings("ignore")
    try:
        from quantmill.prefect_server import prefect_api, startup_timeout

        startup_timeout()  # a bad value would fail Prefect's own settings at import, with no name
        from quantmill.flows.params import check_request, split_recipes

        # Validate everything the user typed before starting a flow run: the flow's own checks.
        recipes = recipe or DEFAULT_RECIPES
        plan = check_request(
            model, recipes, None, dict(dataset=calib, samples=calib_samples, seq_len=seq_len, seed=seed),
            dict(dataset=eval_spec, windows=eval_windows, seq_len=seq_len), device, allow_pickle, register,
        )
        if plot:
            _check_plot_path(plot)
        recipe_names, recipe_yaml = split_recipes(recipes)
        gate = _gate_option(gate_max_ppl_ratio, gate_max_kl, gate_min_top1)
        from quantmill.flows.quantize import quantize_flow

        if not debug:
            _quiet_prefect_console()
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # quantmill's own bars show the stages
        start = time.perf_counter()
        # Without PREFECT_API_URL a temporary server runs for this command only (90 s to start on
        # a loaded machine, not Prefect's 20; it dies with this process, even when killed).
        with prefect_api():
            summary = quantize_flow(
                model=model,
                recipes=recipe_names,
                recipe_yaml=recipe_yaml,
                calibration=plan.calibration,
                evaluation=plan.evaluation,
                register_as=register,
                gate=gate,
                allow_pickle=allow_pickle,
                device=device,
            )
        summary["wall_seconds"] = time.perf_counter() - start
    except QuantmillError as err:
        fail(err, debug)
    except Exception as err:  # an unexpected failure: still one line unless --debug
        fail(RuntimeError(f"{type(err).__name__}: {err}"), debug)
    if plot:
        from quantmill.eval.plots import size_vs_ppl

        size_vs_ppl(summary["reference"], summary["rows"], plot, title=f"{model}: size vs perplexity")
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
        return
    cached = sum(s["cached"] for s in summary["stages"])
    typer.echo("")
    for s in summary["stages"]:
        typer.echo(f"  {s['stage']:<28} {'cached  ' if s['cached'] else 'computed'} {str(s['key'])[:16]}")
    typer.echo(f"\n{model}: float perplexity {summary['reference']['ppl']:.3f}; {cached}/{len(summary['stages'])} stages cached; {summary['wall_seconds']:.1f} s\n")
    typer.echo(results_table(summary))
    if plot:
        typer.echo(f"\nsize vs perplexity plot: {plot}")


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    from quantmill.methods.recipe_files import builtin_recipes, load_recipe

    for name in builtin_recipes():
        r = load_recipe(name)
        typer.echo(f"{name:<24} {r.method:<12} {r.description}")


from quantmill.store_cli import app as store_app  # noqa: E402  (quantmill store ls / gc)

app.add_typer(store_app, name="store")

from quantmill.registry_cli import add_commands as _add_registry_commands  # noqa: E402  (models, show, pull, promote, register)

_add_registry_commands(app)


from quantmill.serve import serve as _serve  # noqa: E402  (issue 16: the UI's deployments)

# The pipeline layers (torch, prefect and mlflow behind them) are imported inside the commands that
# use them, so `quantmill --help` and the light commands start without loading them.

app.command(name="serve")(_serve)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
