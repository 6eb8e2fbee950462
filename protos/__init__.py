"""Protocol buffer definitions (protos/pdserve/v1) and their generated Python code."""
