"""quantmill's batch entry points ask for passive OpenMP waits before torch loads; an explicit choice wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Records OMP_WAIT_POLICY at the moment torch is first imported (libgomp reads it then).
PROBE = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Watch())
import {module}
import torch
print(seen[0])
"""


@pytest.mark.parametrize("module", ["quantmill.cli", "quantmill.flows.quantize"])
@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_entry_points_set_passive_waits_unless_told_otherwise(module: str, given: str | None, expected: str):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == expected  # what libgomp saw when torch loaded


def test_the_library_sets_nothing():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE.format(module="quantmill")], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "None"
