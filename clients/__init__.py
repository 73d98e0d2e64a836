"""loraplex clients: typed Python client for the loraplex HTTP API."""
