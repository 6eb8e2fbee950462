"""The discrete-event simulator: event loop, instance models, KV network, cluster, results."""
