"""The HTTP server: OpenAI-compatible completions with BWArea action controls, and the action explorer page.

    create_app(model, tokenizer, limits, allowed_hosts=...) -> FastAPI app; run it with uvicorn (``bwarea serve``).

Endpoints: GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions (OpenAI wire format, SSE
streaming, and a ``search`` object on completions; openai_routes.py), POST /v1/actions (inverse-dynamics labels of
a text), POST /v1/fanout (next tokens under each action), GET / (the web explorer, from web/). See
docs/serving.md for every field.

The event loop only moves bytes: request bodies are size-checked while they arrive, parsed and tokenised on a
thread, and the model runs on the engine's worker. So one large or slow request cannot stall /health or others.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from . import openai_routes
from .engine import Engine, Limits, Overloaded
from .schemas import ActionsRequest, FanoutRequest, RequestError, error_response, parse_json, validation_message
from ..display import check_token_ids, encode_prompt, fanout_table, label_actions

WEB = Path(__file__).resolve().parent / "web"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class Server:
    """What the routes share: the model, its engine and limits, the search rewards, and the request helpers."""

    def __init__(self, model, tokenizer, limits: Limits, model_id: str, search_rewards: dict | None = None):
        self.model, self.tokenizer, self.limits, self.model_id = model, tokenizer, limits, model_id
        self.search_rewards = load_search_rewards(search_rewards or {})
        self.engine = Engine(model, tokenizer, limits)
        self.context = model.config.max_position_embeddings
        self.num_actions = model.config.num_actions
        self.vocab_size = model.config.vocab_size
        # The most characters one token writes: a text this many times longer than a limit holds more tokens.
        self.max_token_chars = max(len(tokenizer.decode([i])) for i in range(len(tokenizer))) or 1

    async def read(self, request: Request, schema):
        """The request body as a ``schema`` instance: 413 past ``limits.max_body_bytes`` (counted as it arrives),
        400 for anything unparsable; parsing runs on a thread."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit} "
                               "(bwarea serve --max-body-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the request body is over {limit} bytes, this server's limit "
                                   "(bwarea serve --max-body-bytes)")
            chunks.append(chunk)
        return await asyncio.to_thread(parse_json, b"".join(chunks), schema)

    def check_model(self, name) -> None:
        if name is not None and name != self.model_id:
            raise RequestError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                               "model")

    def check_rows(self, prompts: int, samples: int, param: str) -> None:
        if prompts * samples > self.limits.max_batch:
            raise RequestError(400, f"{prompts} prompts x {samples} samples is {prompts * samples} sequences; this "
                               f"server generates at most {self.limits.max_batch} together", param)

    def prompt_ids(self, prompt, new_tokens: int) -> list[int]:
        """A prompt (text or token ids) -> token ids, with room left for ``new_tokens``; RequestError if not.
        Tokenises: call it off the event loop."""
        limit = self.context - new_tokens
        why = f" (the model's {self.context} positions less {new_tokens} new tokens)" if new_tokens else ""
        if self.limits.max_prompt_tokens is not None and self.limits.max_prompt_tokens < limit:
            limit, why = self.limits.max_prompt_tokens, " (this server's max_prompt_tokens)"
        if limit < 1:
            raise RequestError(400, f"max_tokens {new_tokens} leaves no room for a prompt in the model's "
                               f"{self.context} positions", "max_tokens")
        try:
            if not isinstance(prompt, str):
                return check_token_ids(prompt, self.vocab_size, limit, why)
            head = (limit + 1) * self.max_token_chars
            if len(prompt) > head:
                # Tokenise only as much as could fit: a text far above the limit costs no more than one that fits.
                count = len(encode_prompt(self.tokenizer, prompt[:head], 10**12))
                if count > limit:
                    raise ValueError(f"the prompt is more than {limit} tokens long ({len(prompt)} characters); the "
                                     f"limit is {limit}{why}")
            return encode_prompt(self.tokenizer, prompt, limit, why)
        except ValueError as err:
            raise RequestError(400, str(err), "prompt")

    def search_reward(self, name: str | None):
        """A request's ``search.reward`` -> (name, reward callable); only rewards the server was started with."""
        if not self.search_rewards:
            raise RequestError(400, "this server has no search rewards, so it cannot search: start it with "
                               "bwarea serve --search-reward NAME=SPEC", "search")
        if name is None:
            if len(self.search_rewards) > 1:
                raise RequestError(400, f"search.reward is required: this server has several rewards "
                                   f"({', '.join(self.search_rewards)})", "search.reward")
            name = next(iter(self.search_rewards))
        if name not in self.search_rewards:
            raise RequestError(400, f"search.reward {name!r} is not a reward of this server; it has "
                               f"{', '.join(map(repr, self.search_rewards))}", "search.reward")
        return name, self.search_rewards[name]

    async def call(self, fn, request: Request, stop: threading.Event):
        """``engine.call(fn)``, unless the client disconnects first: then ``stop`` is set (fn checks it at its next
        step, so the worker moves on) and the request ends with 499."""
        job = asyncio.ensure_future(self.engine.call(fn))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                stop.set()
                job.cancel()
                raise RequestError(499, "the client closed the connection before the search finished")
            return job.result()
        finally:
            gone.cancel()

    async def wait(self, ticket, request: Request) -> list[dict]:
        """The choices of a queued completion; if the client disconnects first, its rows stop at the next step."""
        gone = asyncio.create_task(_disconnected(request))
        try:
            while True:
                event = asyncio.create_task(ticket.events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()  # nobody is left to answer (499, as nginx logs it); finally frees the rows
                    raise RequestError(499, "the client closed the connection before the completion finished")
                kind, payload = event.result()
                if kind == "error":
                    raise payload
                if kind == "done":
                    return payload
        finally:
            gone.cancel()
            ticket.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class HostCheck:
    """Answers 400 to requests whose Host header is not an allowed name. A page on another site can make a
    browser send requests to 127.0.0.1 under a name it controls (DNS rebinding); checking Host stops that."""

    def __init__(self, app, allowed_hosts):
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and "*" not in self.allowed:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                response = error_response(400, f"host {host!r} is not allowed on this server (allowed: "
                                          f"{', '.join(sorted(self.allowed))}); start it with --allowed-hosts to "
                                          "add the name clients use", "host")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


REWARD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_search_reward(text: str) -> tuple[str, str]:
    """A ``--search-reward`` value -> (name, spec): "love=keyword" -> ("love", "keyword"); a bare spec is its own
    name when it is a valid name ("keyword" -> ("keyword", "keyword"))."""
    name, sep, spec = text.partition("=")
    if not sep:
        name, spec = text, text
    if not REWARD_NAME.fullmatch(name):
        raise ValueError(f"--search-reward {text!r}: give NAME=SPEC, NAME being letters, digits, '_', '.' or '-' "
                         "(the name requests use in search.reward)")
    if not spec:
        raise ValueError(f"--search-reward {text!r} names no reward after '='")
    return name, spec


def load_search_rewards(rewards: dict, task_options: dict | None = None) -> dict:
    """{name: spec string or callable} -> {name: callable}. Specs are what `bwarea rl` takes (a built-in task,
    file.py:function, module:function), loaded now, at start-up: a request only names one of them, so the
    server never loads code a request gives."""
    from ..rl.rewards import load_reward

    loaded = {}
    for name, reward in rewards.items():
        if not isinstance(name, str) or not REWARD_NAME.fullmatch(name):
            raise ValueError(f"search reward name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if isinstance(reward, str):
            reward = load_reward(reward, task_options)
        if not callable(reward):
            raise ValueError(f"search reward {name!r} must be a callable or a reward spec, got "
                             f"{type(reward).__name__}")
        loaded[name] = reward
    return loaded


def allowed_hosts_for(bind_host: str, names: str | None = None) -> list[str]:
    """The Host names ``bwarea serve`` accepts: ``names`` (comma-separated, "*" for any) when given, else the
    local names and the address it listens on (a wildcard address such as 0.0.0.0 is no name a client uses)."""
    if names is not None:
        hosts = [h.strip() for h in names.split(",") if h.strip()]
        if not hosts:
            raise ValueError("--allowed-hosts is empty: name at least one host, or '*' for any")
        return hosts
    wildcard = bind_host in ("0.0.0.0", "::", "")
    return list(LOCAL_HOSTS) + ([] if wildcard or bind_host in LOCAL_HOSTS else [bind_host])


def host_name(host: str) -> str:
    """A Host header -> the name without its port: "localhost:8000" -> "localhost", "[::1]:8000" -> "::1"."""
    host = host.lower()
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.split(":")[0] if host.count(":") == 1 else host  # more colons: a bare IPv6 address


def create_app(model, tokenizer, limits: Limits | None = None, model_id: str | None = None,
               allowed_hosts: list[str] | None = None, search_rewards: dict | None = None) -> FastAPI:
    """A FastAPI app serving ``model`` (a loaded BWAreaForCausalLM) with ``tokenizer`` under ``limits``.

    allowed_hosts: names the Host header may carry ("*" for any); None checks nothing (``bwarea serve`` passes
    the local names and the bound host by default). search_rewards: {name: reward} that ``search`` requests may
    name, a reward being a callable ``reward(prompts, completions, **kw) -> list[float]`` or a spec as `bwarea rl`
    takes ("keyword", "file.py:function"); without any, search requests get 400.
    """
    limits = limits or Limits()
    model_id = model_id or Path(str(getattr(model.config, "name_or_path", "") or "bwarea")).name or "bwarea"
    server = Server(model, tokenizer, limits, model_id, search_rewards)
    engine = server.engine
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="bwarea", summary="BWArea completions with action controls", lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.model_id = engine, limits, model_id
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, err):
        message, param = validation_message(err.errors())
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, err):
        if err.status_code == 404:
            return error_response(404, f"no such endpoint: {request.method} {request.url.path} (docs/serving.md "
                                  "lists them)")
        if err.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}; it takes "
                                  f"{err.headers.get('Allow', 'another method') if err.headers else 'another method'}")
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(RequestError)
    async def on_request_error(request, err):
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(Overloaded)
    async def on_overloaded(request, err):
        return error_response(503, str(err))

    @app.exception_handler(Exception)
    async def on_unexpected(request, err):
        # A bug, not the client's fault: still an OpenAI-style error body (uvicorn logs the traceback).
        return error_response(500, f"internal error: {type(err).__name__}: {err}")

    @app.exception_handler(ValueError)
    async def on_value_error(request, err):
        # The model and helpers raise ValueError for inputs they cannot take; that is the client's to fix.
        return error_response(400, str(err))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": created, "owned_by": "bwarea",
            "max_model_len": server.context, "num_actions": server.num_actions,
            # What a request that names no action_temperature gets (the explorer starts from it).
            "action_temperature": model.action_temperature,
            "search": {"rewards": list(server.search_rewards), "max_budget": limits.max_search_budget,
                       "max_tokens": limits.max_tokens, "timeout_s": limits.search_timeout}}]}

    @app.post("/v1/actions")
    async def actions(request: Request):
        body = await server.read(request, ActionsRequest)
        server.check_model(body.model)
        ids = await asyncio.to_thread(server.prompt_ids, body.prompt, 0)
        tokens = await engine.call(lambda: label_actions(model, tokenizer, ids))
        return {"object": "actions", "model": model_id, "num_actions": server.num_actions, "tokens": tokens}

    @app.post("/v1/fanout")
    async def fanout(request: Request):
        body = await server.read(request, FanoutRequest)
        server.check_model(body.model)
        if body.top_k > limits.max_top_k:
            raise RequestError(400, f"top_k {body.top_k} is above this server's limit {limits.max_top_k}", "top_k")
        bad = [a for a in body.actions or [] if not 0 <= a < server.num_actions]
        if body.actions == [] or bad:
            raise RequestError(400, f"action {bad[0]} is outside [0, {server.num_actions})" if bad else
                               "actions is empty: list at least one action, or leave it out for all of them",
                               "actions")
        # The next-token logits of a full context are still defined: no room for new tokens is needed.
        ids = await asyncio.to_thread(server.prompt_ids, body.prompt, 0)
        table = await engine.call(lambda: fanout_table(model, tokenizer, ids, body.top_k, body.actions))
        return {"object": "fanout", "model": model_id, "prompt_tokens": len(ids), **table}

    openai_routes.register(app, server)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)  # no icon, and no 404 in the log on every page load

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app
