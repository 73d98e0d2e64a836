"""loraplex clients: typed Python client for the loraplex HTTP API."""

from loraplex.clients.client import (
    Adapter,
    AsyncLoraplexClient,
    Completion,
    LoraplexClient,
    LoraplexError,
    Model,
    Usage,
)

__all__ = ["Adapter", "AsyncLoraplexClient", "Completion", "LoraplexClient", "LoraplexError", "Model", "Usage"]
