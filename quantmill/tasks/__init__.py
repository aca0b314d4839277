"""Prefect tasks: one pipeline stage each, reading and writing the stage store."""
