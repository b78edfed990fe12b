"""Itera-Lite's HTTP server: OpenAI-style completions with continuous batching of recurrent states.

Run it with `python -m serve --model FOLDER`; `create_app` builds the same app for tests and embedding.
"""

from .app import create_app
from .engine import Engine, Limits

__all__ = ["Engine", "Limits", "create_app"]
