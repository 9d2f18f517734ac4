"""The web page and REST API (`resmemnet serve`); needs the `serve` extra (FastAPI, uvicorn)."""

from resmemnet.serve.app import ServeSettings, create_app
from resmemnet.serve.batching import MicroBatcher

__all__ = ["MicroBatcher", "ServeSettings", "create_app"]
