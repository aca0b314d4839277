"""Prefect flows: parameters, fan-out, and what runs after what. No maths here."""
