"""`bwarea serve`: the OpenAI-compatible server and the web action explorer."""

from __future__ import annotations

import argparse

from .inference import add_model_args, load_model

EPILOG = """examples:
  bwarea serve                                   # shipped model on http://127.0.0.1:8000 (web explorer at /)
  bwarea serve --model ./my-bwarea --port 9000 --max-tokens 512 --max-batch 16
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The king said", "max_tokens": 20, "actions": 17, "return_actions": true}'

Requests above a limit get a 400 naming it; when --queue-size requests are already waiting, a 503.
docs/serving.md describes every endpoint and field."""


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve completions over HTTP, with the web action explorer",
                              description="Serve a BWArea model: OpenAI-compatible /v1/completions with action "
                                          "controls, /v1/actions, /v1/fanout, and the explorer page at /.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-id", default=None, help="the model name clients see (default: the folder name)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens per completion (default 256)")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens (default: the model's context)")
    g.add_argument("--max-n", type=int, default=8, help="most completions per prompt (default 8)")
    g.add_argument("--max-batch", type=int, default=8, help="most sequences generated together (default 8)")
    g.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more get 503 (default 64)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from bwarea.serve import Limits, create_app

    for name in ("max_tokens", "max_n", "max_batch", "queue_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError("--max-prompt-tokens must be >= 1")
    model, tokenizer = load_model(args)
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
                    max_batch=args.max_batch, queue_size=args.queue_size)
    from pathlib import Path

    model_id = args.model_id or ("bwarea-default" if args.model is None else Path(args.model).resolve().name)
    app = create_app(model, tokenizer, limits, model_id=model_id)
    print(f"bwarea: serving {app.state.model_id} on http://{args.host}:{args.port}/ (explorer at /, API under /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
