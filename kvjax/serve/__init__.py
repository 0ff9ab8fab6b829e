"""Serving: an in-process engine that runs many requests at once over one paged KV pool
(continuous batching, chunked prefill, automatic prefix caching).

``kvjax.serve.Engine`` is the API (``kvjax/serve/engine.py``'s docstring lists it).
``kvjax.serve.server.create_app`` serves an engine over HTTP (the ``serve`` extra:
FastAPI, uvicorn, prometheus_client); ``kvjax-serve`` is the command (docs/serving.md)."""

from kvjax.serve.engine import Completion, Delta, Engine, EngineOverloaded, RequestHandle

__all__ = ["Completion", "Delta", "Engine", "EngineOverloaded", "RequestHandle"]
