"""quantmill's numerical library: quantizers, calibration, statistics, checkpoints, evaluation.

Nothing here imports prefect or mlflow (tests/test_layering.py checks), so every function can be
used from a notebook without a server.
"""

__version__ = "0.1.0"
