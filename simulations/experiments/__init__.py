"""Experiments over the simulator: spec parsing, goodput search, plots."""
