"""Trace loaders and generators; every one returns a columnar ``Trace``."""
