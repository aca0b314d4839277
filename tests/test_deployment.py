"""Scheduled requantization: the quantize flow deploys with a cron schedule to a real Prefect API,
and infra/prefect.yaml names an entrypoint that exists."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_flow_deploys_with_a_nightly_schedule(prefect_api):
    from prefect.client.orchestration import get_client

    from flows.quantize import quantize_flow

    deployment = quantize_flow.to_deployment(
        name="nightly-test", cron="0 3 * * *", parameters={"model": "demo", "recipes": ["w8a16-rtn"], "register_as": "smollm2"}
    )
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.parameters["recipes"] == ["w8a16-rtn"]
    assert stored.schedules and stored.schedules[0].schedule.cron == "0 3 * * *"
    assert "calibration" in stored.parameter_openapi_schema["properties"]  # pydantic params render as a form


def test_infra_prefect_yaml_entrypoints_exist():
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        assert func in (REPO / path).read_text()
        from quant.recipe import load_recipe

        for recipe in d["parameters"].get("recipes", []):
            load_recipe(recipe)
