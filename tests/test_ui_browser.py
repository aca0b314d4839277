"""A person runs quantize from the Prefect UI: headless Chromium (Debian's /usr/bin/chromium,
installed by `make test`) driven by Playwright opens the deployment's run page on a real Prefect
server, finds the fields and the recipe choices, fills them in, submits, and sees the flow run
(executed by `quantmill serve`) reach Completed with the full results table.

With QUANTMILL_SCREENSHOTS=DIR the form and the finished run are also saved there (the README's
pictures come from `QUANTMILL_SCREENSHOTS=docs pytest tests/test_ui_browser.py`)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.served import api, deployments, env_for, prefect_server, quantmill_serve
from tests.tiny import make_tiny_llama

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
COLUMNS = ["recipe", "ppl", "ppl_ratio", "kl", "top1_agreement", "size_mb", "bits_per_weight", "quantize_seconds", "uri"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian's chromium (`make test` installs it)")


def _field(page, title: str):
    """The input area of the form property titled TITLE (the UI's labels point nowhere usable)."""
    return page.locator(
        "xpath=//div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')]"
        f"[./div[contains(@class,'p-label__header')]//span[contains(@class,'schema-form-property__label') and starts-with(normalize-space(.), '{title}')]]"
        "/div[contains(@class,'p-label__body')]"
    )


def _toggle_options(page, title: str, values: list[str]) -> list[str]:
    """Open a select (Space on its button: a click does not open it), click VALUES, close; the
    options the select offered."""
    _field(page, title).locator("button.p-select-button__control").focus()
    page.keyboard.press(" ")
    page.get_by_role("option").first.wait_for()
    offered = page.get_by_role("option").all_inner_texts()
    for value in values:
        page.get_by_role("option", name=value, exact=True).click()
    page.keyboard.press("Escape")
    return offered


def _shot(page, name: str, shots: list[Path]) -> None:
    path = shots[0] / name
    page.screenshot(path=str(path))
    for extra in shots[1:]:
        shutil.copy(path, extra / name)


def test_a_person_runs_quantize_from_the_form(tmp_path):
    from playwright.sync_api import sync_playwright

    model = make_tiny_llama(tmp_path / "tiny-llama")
    shots = [tmp_path] + ([Path(os.environ["QUANTMILL_SCREENSHOTS"])] if os.environ.get("QUANTMILL_SCREENSHOTS") else [])
    with prefect_server(tmp_path / "prefect-server") as base, quantmill_serve(env_for(base, tmp_path / "quantmill", tmp_path / "prefect-client"), tmp_path / "serve.log"):
        ui = base.removesuffix("/api")
        deployment = deployments(base)["quantize"]
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS, viewport={"width": 1400, "height": 2500})
            try:
                page = browser.new_page()
                page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run", wait_until="networkidle")
                for title in ("Model source", "Built-in recipes", "Extra recipes (YAML)", "Samples (N)", "Tokens per window", "Register as", "Device", "Quality gate"):
                    _field(page, title).wait_for()
                assert "hf:ORG/NAME@REVISION" in page.get_by_text("Which model to quantize").inner_text()  # the source forms are spelled out

                # A malformed source is refused on Submit, with the reason on the page; no run is made.
                _field(page, "Model source").locator("textarea").fill("hf:no-org")
                page.set_viewport_size({"width": 1400, "height": 900})
                page.get_by_role("button", name="Submit").click()
                refusal = page.get_by_text("Error creating flow run").first
                refusal.wait_for()
                assert "Validation failed for field 'model'" in refusal.inner_text() and "'hf:no-org' does not match" in refusal.inner_text()
                assert api(base, "POST", "/flow_runs/filter", {})[1] == []
                time.sleep(1)  # the message slides in
                _shot(page, "ui-quantize-refused.png", shots)
                page.set_viewport_size({"width": 1400, "height": 2500})
                try:  # let the message go before the picture of the form
                    page.get_by_text("Error creating flow run").last.wait_for(state="hidden", timeout=20_000)
                except Exception:
                    pass

                _field(page, "Model source").locator("textarea").fill(str(model))
                offered = _toggle_options(page, "Built-in recipes", ["w4a16-rtn-g64", "w4a16-rtn"])  # default w8a16-rtn + w4a16-rtn-g64
                assert {"w8a16-rtn", "w4a16-gptq-g64", "w8a8-dynamic", "fp8-dynamic"} <= set(offered), offered
                _field(page, "Samples (N)").locator("input").fill("8")
                _field(page, "Tokens per sample (L)").locator("input").fill("64")
                _field(page, "Windows (K)").locator("input").fill("2")
                _field(page, "Tokens per window").locator("input").fill("64")
                _field(page, "Register as").locator("textarea").fill("browser")
                # The gate's three limits show at once (each an optional number: its "float" button, then the value).
                limit = _field(page, "Highest ppl ratio")
                limit.get_by_role("button", name="float").click()
                limit.locator("input").fill("50")
                assert _toggle_options(page, "Device", ["cpu"]) == ["auto", "cpu", "cuda"]
                # A custom recipe made in the form (issue 18): one button per registered method, then
                # that method's own fields; here rtn_lsq per channel with one of its options changed.
                custom = _field(page, "Custom recipe")
                assert {"rtn", "gptq", "awq", "smoothquant", "llm_int8", "rtn_lsq"} <= set(custom.get_by_role("button").all_inner_texts())
                custom.get_by_role("button", name="rtn_lsq", exact=True).click()
                _field(page, "Refits").wait_for()  # the method's own options show (rtn_lsq's, not rtn's)
                _field(page, "Recipe name").locator("textarea").fill("form-lsq")
                _field(page, "Bits").locator("input").fill("4")
                page.keyboard.press("Tab")
                _field(page, "Refits").locator("input").fill("2")
                page.keyboard.press("Tab")
                assert not _field(page, "Clip Search").count()  # rtn_lsq's own options, not rtn's
                _field(page, "Recipe name").scroll_into_view_if_needed()
                _shot(page, "ui-quantize-custom-recipe.png", shots)
                assert _field(page, "Built-in recipes").locator(".p-tag").all_inner_texts() == ["w8a16-rtn", "w4a16-rtn"]
                page.get_by_text("Run Name", exact=True).scroll_into_view_if_needed()
                _shot(page, "ui-quantize-form.png", shots)
                page.get_by_role("button", name="Submit").click()
                page.wait_for_url(re.compile(r".*/deployments/deployment/[^/?]+(\?.*)?$"))  # off the run page: accepted

                runs: list = []
                for _ in range(60):  # the page moves on as it sends the request
                    _, runs = api(base, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
                    if runs:
                        break
                    time.sleep(0.5)
                assert len(runs) == 1, runs
                run = runs[0]
                assert run["parameters"]["recipes"] == ["w8a16-rtn", "w4a16-rtn"] and run["parameters"]["device"] == "cpu"
                assert run["parameters"]["gate"]["max_ppl_ratio"] == 50
                custom_recipe = run["parameters"]["custom_recipe"]
                assert (custom_recipe["method"], custom_recipe["name"], custom_recipe["weights"]["bits"], custom_recipe["rtn_lsq_options"]["refits"]) == ("rtn_lsq", "form-lsq", 4, 2)
                page.goto(f"{ui}/runs/flow-run/{run['id']}")
                page.locator(".page-heading-flow-run__meta .state-badge.state--completed").wait_for(timeout=600_000)
                page.locator("li.p-tab#artifacts").click()
                page.get_by_text("quantize-results", exact=True).click()
                table = page.locator("table").first
                table.wait_for()
                header = [h.strip() for h in table.locator("th").all_inner_texts()]
                assert [c for c in COLUMNS if c not in header] == [], header
                rows = [[c.strip() for c in r.locator("td").all_inner_texts()] for r in table.locator("tbody tr").all()]
                assert [r[header.index("recipe")] for r in rows] == ["float (reference)", "w8a16-rtn", "w4a16-rtn", "form-lsq"]
                assert all(len(r) == len(header) for r in rows)  # every column for every row
                assert rows[1][header.index("uri")] == "models:/browser-w8a16-rtn/1"
                assert rows[2][header.index("uri")] == "models:/browser-w4a16-rtn/1"
                assert rows[3][header.index("uri")] == "models:/browser-form-lsq/1"
                assert rows[0][header.index("kl")] == "\u2014"  # no value for the reference, shown as such
                page.set_viewport_size({"width": 2600, "height": 600})
                _shot(page, "ui-quantize-results.png", shots)
                page.set_viewport_size({"width": 1400, "height": 1150})
                page.go_back()
                page.locator("li.p-tab#artifacts").click()
                page.get_by_text("quantize-stages", exact=True).wait_for()
                _shot(page, "ui-quantize-run.png", shots)
            finally:
                browser.close()
