"""Prefect flows: parameters, fan-out, and what runs after what. No maths here."""

from quantmill.core.threads import prefer_passive_waits

prefer_passive_waits()  # a worker imports this package before torch (quantmill/core/threads.py says why)
