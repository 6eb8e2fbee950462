"""Worker-side gRPC services: prefill and decode workers wrapping the engine (plain classes, no Ray)."""
