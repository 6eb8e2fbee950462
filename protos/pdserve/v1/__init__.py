"""pdserve protocol v1: worker services (generated code next to the .proto files)."""
