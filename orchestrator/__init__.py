"""pdserve orchestrator: the pure policy core and the live runtime around it."""
