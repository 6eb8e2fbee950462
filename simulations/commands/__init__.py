"""`pdserve` sub-commands of the simulator (each a module with add_arguments and main)."""
