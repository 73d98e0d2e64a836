"""loraplex server: CLI, configs, HTTP API, engine, model loading, metrics."""
