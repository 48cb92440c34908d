"""The HTTP server: OpenAI-compatible completions with BWArea action controls, and the action explorer page.

    create_app(model, tokenizer, limits) -> FastAPI app; run it with uvicorn (``bwarea serve`` does).

Endpoints: GET /health, GET /v1/models, POST /v1/completions (OpenAI wire format, SSE streaming),
POST /v1/actions (inverse-dynamics labels of a text), POST /v1/fanout (next tokens under each action),
GET / (the web explorer, from web/). See docs/serving.md for every field.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .engine import Completion, Engine, Limits, Overloaded
from .views import check_action_options, check_token_ids, encode_prompt, fanout_table, label_actions

WEB = Path(__file__).resolve().parent / "web"

Prompt = str | list[str] | list[int]


class StrictModel(BaseModel):
    # Unknown fields and wrong types are the client's mistake to hear about, not to have silently coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class CompletionRequest(StrictModel):
    model: str | None = None
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-2**63, lt=2**64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0)] | None = None
    user: str | None = None
    # BWArea controls
    actions: int | list[int] | None = Field(None, description="an action for every new token, or a schedule "
                                            "(one per new token, -1: the policy chooses)")
    allowed_actions: list[int] | None = None
    action_temperature: Annotated[float, Field(gt=0)] | None = None
    action_greedy: bool | None = None
    return_actions: bool = False


class ActionsRequest(StrictModel):
    model: str | None = None
    prompt: str | list[int]


class FanoutRequest(StrictModel):
    model: str | None = None
    prompt: str | list[int]
    top_k: Annotated[int, Field(ge=1)] = 5
    actions: list[int] | None = None


class RequestError(Exception):
    """A request the server understood but cannot serve as asked: status and message go to the client."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


# Fields that take one of several shapes: pydantic reports each alternative; say what is accepted instead.
UNION_FIELDS = {
    "prompt": "a string, a list of strings, or a list of token ids",
    "stop": "a string or a list of up to 4 strings",
    "actions": "an action number, or a list of them (one per new token, -1: the policy chooses)",
}


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's errors -> one readable line and the first bad field."""
    parts, param = [], None
    for e in err.errors():
        if e.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = loc[0] if loc else "body"
        param = param or field
        if field in UNION_FIELDS and len(loc) > 1:
            parts.append(f"{field} must be {UNION_FIELDS[field]}")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {e['msg']}")
    return "invalid request: " + "; ".join(list(dict.fromkeys(parts))[:6]), param


def create_app(model, tokenizer, limits: Limits | None = None, model_id: str | None = None) -> FastAPI:
    """A FastAPI app serving ``model`` (a loaded BWAreaForCausalLM) with ``tokenizer`` under ``limits``."""
    limits = limits or Limits()
    engine = Engine(model, tokenizer, limits)
    context = model.config.max_position_embeddings
    num_actions = model.config.num_actions
    model_id = model_id or Path(str(getattr(model.config, "name_or_path", "") or "bwarea")).name or "bwarea"
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="bwarea", summary="BWArea completions with action controls", lifespan=lifespan)
    app.state.engine, app.state.limits, app.state.model_id = engine, limits, model_id

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, err):
        message, param = validation_message(err)
        return error_response(400, message, param)

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

    def check_model(name):
        if name is not None and name != model_id:
            raise RequestError(404, f"model {name!r} is not served here; this server serves {model_id!r}", "model")

    def prompt_ids(prompt, new_tokens: int) -> list[int]:
        """A prompt (text or token ids) -> token ids, with room left for ``new_tokens``; RequestError if not."""
        limit = context - new_tokens
        why = f" (the model's {context} positions less {new_tokens} new tokens)" if new_tokens else ""
        if limits.max_prompt_tokens is not None and limits.max_prompt_tokens < limit:
            limit, why = limits.max_prompt_tokens, " (this server's max_prompt_tokens)"
        if limit < 1:
            raise RequestError(400, f"max_tokens {new_tokens} leaves no room for a prompt in the model's {context} "
                               "positions", "max_tokens")
        try:
            if isinstance(prompt, str):
                return encode_prompt(tokenizer, prompt, limit, why)
            return check_token_ids(prompt, model.config.vocab_size, limit, why)
        except ValueError as err:
            raise RequestError(400, str(err), "prompt")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": created, "owned_by": "bwarea",
            "max_model_len": context, "num_actions": num_actions}]}

    @app.post("/v1/actions")
    async def actions(body: ActionsRequest):
        check_model(body.model)
        ids = prompt_ids(body.prompt, 0)
        tokens = await engine.call(lambda: label_actions(model, tokenizer, ids))
        return {"object": "actions", "model": model_id, "num_actions": num_actions, "tokens": tokens}

    @app.post("/v1/fanout")
    async def fanout(body: FanoutRequest):
        check_model(body.model)
        if body.top_k > limits.max_top_k:
            raise RequestError(400, f"top_k {body.top_k} is above this server's limit {limits.max_top_k}", "top_k")
        bad = [a for a in body.actions or [] if not 0 <= a < num_actions]
        if body.actions == [] or bad:
            raise RequestError(400, f"action {bad[0]} is outside [0, {num_actions})" if bad else
                               "actions is empty: list at least one action, or leave it out for all of them",
                               "actions")
        ids = prompt_ids(body.prompt, 0)  # the next-token logits of a full context are still defined
        table = await engine.call(lambda: fanout_table(model, tokenizer, ids, body.top_k, body.actions))
        return {"object": "fanout", "model": model_id, "prompt_tokens": len(ids), **table}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        job = completion_job(body)
        ticket = engine.submit(job)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            return StreamingResponse(stream_completion(ticket, body, job, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                kind, payload = await ticket.events.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    break
        finally:
            ticket.cancel()
        choices = [choice_json(c, body) for c in payload]
        return {**meta, "choices": choices, "usage": usage(job, payload)}

    def completion_job(body: CompletionRequest) -> Completion:
        if body.max_tokens > limits.max_tokens:
            raise RequestError(400, f"max_tokens {body.max_tokens} is above this server's limit {limits.max_tokens}",
                               "max_tokens")
        if body.n > limits.max_n:
            raise RequestError(400, f"n {body.n} is above this server's limit {limits.max_n}", "n")
        if body.logprobs is not None and body.logprobs > min(5, limits.max_top_k):
            raise RequestError(400, f"logprobs {body.logprobs} is above the limit {min(5, limits.max_top_k)}",
                               "logprobs")
        if body.logprobs is not None and body.stream:
            raise RequestError(400, "logprobs are computed after generation and cannot be streamed; "
                               "ask without stream", "logprobs")
        # A list of strings is several prompts; a list of ints (or an empty list) is one prompt of token ids.
        several = isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str)
        prompts = body.prompt if several else [body.prompt]
        ids = [prompt_ids(p, body.max_tokens) for p in prompts]
        if len(ids) * body.n > limits.max_batch:
            raise RequestError(400, f"{len(ids)} prompts x n={body.n} is {len(ids) * body.n} sequences; this server "
                               f"generates at most {limits.max_batch} together", "n")
        try:
            check_action_options(num_actions, body.actions, body.allowed_actions, body.max_tokens)
        except ValueError as err:
            raise RequestError(400, str(err), "actions")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        # temperature 0 is argmax tokens; unless told otherwise its actions are argmax too, so it is deterministic.
        action_greedy = body.action_greedy if body.action_greedy is not None else (
            body.temperature == 0 and body.action_temperature is None)
        return Completion(
            prompts=ids, max_tokens=body.max_tokens, n=body.n, stop=stop, temperature=body.temperature,
            top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed,
            actions=body.actions, allowed_actions=body.allowed_actions, action_greedy=action_greedy,
            action_temperature=body.action_temperature or 1.0, logprobs=body.logprobs, stream=body.stream)

    async def stream_completion(ticket, body: CompletionRequest, job: Completion, meta: dict):
        sent = {}  # choice index -> characters of text streamed so far
        try:
            while True:
                kind, payload = await ticket.events.get()
                if kind == "token":
                    index, shown, token, action, piece = payload
                    sent[index] = sent.get(index, 0) + len(shown)
                    choice = {"index": index, "text": shown, "logprobs": None, "finish_reason": None}
                    if body.return_actions and token is not None:
                        choice.update(tokens=[piece], token_ids=[token], actions=[action])
                    yield sse({**meta, "choices": [choice]})
                elif kind == "done":
                    for c in payload:
                        rest = c["text"][sent.get(c["index"], 0):]
                        choice = {"index": c["index"], "text": rest, "logprobs": None,
                                  "finish_reason": c["finish_reason"]}
                        if body.return_actions:
                            choice["action_logprobs"] = c["action_logprobs"]
                        yield sse({**meta, "choices": [choice]})
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse({**meta, "choices": [], "usage": usage(job, payload)})
                    break
                else:
                    status, message = (400, str(payload)) if isinstance(payload, ValueError) else (
                        500, f"generation failed: {type(payload).__name__}: {payload}")
                    yield sse({"error": {"message": message, "type": "invalid_request_error" if status == 400
                                         else "server_error", "param": None, "code": status}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            ticket.cancel()  # a client that went away stops its rows at the next step

    def choice_json(c: dict, body: CompletionRequest) -> dict:
        choice = {"index": c["index"], "text": c["text"], "logprobs": c["logprobs"],
                  "finish_reason": c["finish_reason"]}
        if body.return_actions:
            choice.update(tokens=c["tokens"], token_ids=c["token_ids"], actions=c["actions"],
                          action_logprobs=c["action_logprobs"])
        return choice

    def usage(job: Completion, choices: list[dict]) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(c["token_ids"]) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
