"""OpenMP threads that sleep while they wait, for batch work on machines shared with other jobs.

torch's CPU kernels run on OpenMP threads (2 on a 2-core machine). By default libgomp lets a
waiting thread spin before it sleeps, which is fastest on an idle machine; when another process
holds one of the cores, every parallel operation waits a whole scheduler time slice for the
thread that lost its core. Measured on 2 cores beside a running test suite (2026-12-06): demo's
RTN W4 clipping search 133 s spinning, 6.4 s with passive waits; tests/test_gptq_walk.py +
test_awq_method.py 65.4 s against 8.2 s. quantmill's batch entry points (the CLI, the flows a
worker runs, the tests and benches) therefore ask for passive waits. It has to happen before
torch is first imported (libgomp reads the variable once); an explicit OMP_WAIT_POLICY wins.
The library itself sets nothing: a program that imports it for serving keeps its own policy.
"""

from __future__ import annotations

import os


def prefer_passive_waits() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
