"""pdserve simulator: replays real traces against a simulated cluster using orchestrator.core policies."""
