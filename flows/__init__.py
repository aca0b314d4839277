"""Prefect flows: parameters, fan-out, and what runs after what. No maths here."""

from quantmill.threads import prefer_passive_waits

prefer_passive_waits()  # a worker imports this package before torch (quantmill/threads.py says why)
