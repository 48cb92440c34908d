"""Serving BWArea: the OpenAI-compatible HTTP server, its model worker, and the web action explorer.

    from bwarea.serve import create_app, Limits
    app = create_app(model, tokenizer, Limits(max_tokens=256))   # then: uvicorn.run(app)
"""

from .app import create_app
from .engine import Limits

__all__ = ["create_app", "Limits"]
