"""Runs: result dataclasses, the run store and atomic writes."""
