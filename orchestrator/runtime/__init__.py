"""The live runtime: Ray controller, workers' gRPC services, OpenAI HTTP front end, metrics."""
