"""`bwarea serve`: the OpenAI-compatible server and the web action explorer."""

from __future__ import annotations

import argparse

from . import port
from .inference import add_model_args, load_model

EPILOG = """examples:
  bwarea serve                                   # shipped model on http://127.0.0.1:8000 (web explorer at /)
  bwarea serve --model ./my-bwarea --port 9000 --max-tokens 512 --max-batch 16
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The king said", "max_tokens": 20, "actions": 17, "return_actions": true}'

  bwarea serve --host 0.0.0.0 --allowed-hosts myserver.lan,192.168.1.20   # reachable from the network

  # search over actions on /v1/completions, with rewards named here (requests pick one by name):
  bwarea serve --search-reward sentiment --search-reward love=keyword --search-reward mine=my_rewards.py:brevity \\
               --max-search-budget 4096 --search-timeout 30
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The king said", "max_tokens": 12, "seed": 0,
            "search": {"method": "mcts", "budget": 600, "reward": "love"}}'

Requests above a limit get a 400 naming it; when --queue-size requests are already waiting, a 503.
docs/serving.md describes every endpoint and field."""


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve completions over HTTP, with the web action explorer",
                              description="Serve a BWArea model: OpenAI-compatible /v1/completions with action "
                                          "controls, /v1/actions, /v1/fanout, and the explorer page at /.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port, 1..65535 (default 8000)")
    p.add_argument("--model-id", default=None, help="the model name clients see (default: the folder name)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated names the Host header may carry, '*' for any (default: localhost, "
                        "127.0.0.1, ::1 and --host); others get 400, which stops DNS-rebinding pages")
    g = p.add_argument_group("limits")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens per completion (default 256)")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens (default: the model's context)")
    g.add_argument("--max-n", type=int, default=8, help="most completions per prompt (default 8)")
    g.add_argument("--max-batch", type=int, default=8, help="most sequences generated together (default 8)")
    g.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more get 503 (default 64)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body; larger ones get 413 before they are read (default 1048576)")
    g.add_argument("--max-search-budget", type=int, default=2048, metavar="N",
                   help="most world-model token evaluations one search request may spend (default 2048)")
    g.add_argument("--search-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="longest one search may run; it holds the model meanwhile (default 60)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s = p.add_argument_group("search rewards (the `search` object of /v1/completions)")
    s.add_argument("--search-reward", action="append", default=[], metavar="NAME=SPEC",
                   help="a reward search requests may name: SPEC is a built-in task (keyword, length, sentiment), "
                        "file.py:function or module:function, as `bwarea rl` takes; a bare task name is its own "
                        "NAME; repeatable. Without any, search requests get 400")
    s.add_argument("--search-keyword", default="love", metavar="WORDS",
                   help="keyword task: comma-separated words (default: love)")
    s.add_argument("--search-target-words", type=int, default=8, metavar="N",
                   help="length task: target completion length in words (default 8)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from bwarea.serve import Limits, create_app
    from bwarea.serve.app import allowed_hosts_for

    import math

    from bwarea.serve.app import load_search_rewards, parse_search_reward

    for name in ("max_tokens", "max_n", "max_batch", "queue_size", "max_body_bytes", "max_search_budget",
                 "search_target_words"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError("--max-prompt-tokens must be >= 1")
    if not (math.isfinite(args.search_timeout) and args.search_timeout > 0):
        raise ValueError(f"--search-timeout must be a finite number of seconds > 0, got {args.search_timeout}")
    hosts = allowed_hosts_for(args.host, args.allowed_hosts)
    # Rewards load before the model, so a bad spec fails in a second, not after loading.
    specs = {}
    for text in args.search_reward:
        name, spec = parse_search_reward(text)
        if name in specs:
            raise ValueError(f"--search-reward {text!r}: the name {name!r} is given twice")
        specs[name] = spec
    rewards = load_search_rewards(specs, {"keywords": args.search_keyword, "target_words": args.search_target_words})
    model, tokenizer = load_model(args)
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
                    max_batch=args.max_batch, queue_size=args.queue_size, max_body_bytes=args.max_body_bytes,
                    max_search_budget=args.max_search_budget, search_timeout=args.search_timeout)
    from pathlib import Path

    model_id = args.model_id or ("bwarea-default" if args.model is None else Path(args.model).resolve().name)
    app = create_app(model, tokenizer, limits, model_id=model_id, allowed_hosts=hosts, search_rewards=rewards)
    print(f"bwarea: serving {app.state.model_id} on http://{args.host}:{args.port}/ (explorer at /, API under /v1)")
    if rewards:
        print(f"bwarea: search rewards: {', '.join(f'{n}={s}' for n, s in specs.items())} (budget <= "
              f"{args.max_search_budget}, {args.search_timeout:g} s)")
    print(f"bwarea: requests must name one of these hosts: {', '.join(hosts)} (--allowed-hosts)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
