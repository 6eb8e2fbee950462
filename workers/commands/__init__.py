"""`pdserve` sub-commands that run workers directly (no Ray)."""
