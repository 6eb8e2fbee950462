"""The OpenAI-compatible HTTP front end: ``create_app`` over a ``GenerationBackend``, ``serve`` to run it."""

from orchestrator.runtime.http.app import API_KEY_ENV, create_app
from orchestrator.runtime.http.config import PromptTokenizer, ServerLimits, WallClock
from orchestrator.runtime.http.server import ServerHandle, serve

__all__ = ["API_KEY_ENV", "PromptTokenizer", "ServerHandle", "ServerLimits", "WallClock", "create_app", "serve"]
