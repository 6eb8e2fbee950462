"""`pdserve` sub-commands of the orchestrator (each a module with add_arguments and main)."""
