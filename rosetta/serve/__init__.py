"""The HTTP server: the tasks over HTTP, with micro-batching, an embedding cache, API keys and metrics."""

from rosetta.serve.app import ROUTERS, Settings, create_app, services

__all__ = ["ROUTERS", "Settings", "create_app", "services"]
