"""Latency models: how long one engine step takes for a given batch shape."""
