"""What the server accepts and how it says no: request bodies, body parsing, and the OpenAI error shape.

Every error the server sends is ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status:
400 a bad request, 404 an unknown model or path, 405 a wrong method, 413 a body above the limit, 503 a full
queue, 500 a bug.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Prompt = str | list[str] | list[int] | list[list[int]]


class StrictModel(BaseModel):
    # Unknown fields and wrong types are the client's mistake to hear about, not to have silently coerced.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-2**63, lt=2**64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # BWArea controls
    actions: int | list[int] | None = Field(None, description="an action for every new token, or a schedule "
                                            "(one per new token, -1: the policy chooses)")
    allowed_actions: list[int] | None = None
    action_temperature: Annotated[float, Field(gt=0)] | None = None
    action_greedy: bool | None = None


class SearchOptions(StrictModel):
    """The ``search`` object of /v1/completions: search over actions for the completion a server reward scores
    highest (bwarea.search). The method options are those of ``bwarea search``; one given for another method is a
    400 naming it."""

    method: Literal["mcts", "beam", "best_of_n"] = "mcts"
    budget: Annotated[int, Field(ge=1)]  # world-model token evaluations
    reward: str | None = None  # a name given to `bwarea serve --search-reward NAME=SPEC`
    # best_of_n
    n: Annotated[int, Field(ge=1)] | None = None
    action_temperature: Annotated[float, Field(gt=0)] | None = None
    # beam
    beams: Annotated[int, Field(ge=1)] | None = None
    branches: Annotated[int, Field(ge=1)] | None = None
    # mcts
    cpuct: Annotated[float, Field(ge=0)] | None = None
    root_branches: Annotated[int, Field(ge=1)] | None = None
    lower_branches: Annotated[int, Field(ge=1)] | None = None
    rounds: Annotated[int, Field(ge=1)] | None = None
    rollout_action_temperature: Annotated[float, Field(ge=0)] | None = None
    expansion: Literal["fanout", "topk"] | None = None
    value: Literal["q"] | None = None  # the model's learned action-value head (bwarea rl --algo q)


# search option -> the method that takes it
SEARCH_OPTION_METHODS = {"n": "best_of_n", "action_temperature": "best_of_n", "beams": "beam", "branches": "beam",
                         "cpuct": "mcts", "root_branches": "mcts", "lower_branches": "mcts", "rounds": "mcts",
                         "rollout_action_temperature": "mcts", "expansion": "mcts", "value": "mcts"}


class CompletionRequest(SamplingFields):
    prompt: Prompt
    suffix: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] = 16
    best_of: Annotated[int, Field(ge=1)] | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    return_actions: bool = False
    search: SearchOptions | None = None


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0)] | None = None


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


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 503: "overloaded_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": None}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status)


# Fields that take one of several shapes: pydantic reports each alternative; say what is accepted instead.
UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of up to 4 strings",
    "actions": "an action number, or a list of them (one per new token, -1: the policy chooses)",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors -> one readable line and the first bad field."""
    parts, param = [], None
    for e in errors:
        if e.get("type") == "json_invalid":
            why = str(e.get("ctx", {}).get("error", e["msg"]))
            kind = "valid Unicode text" if "unicode" in why or "surrogate" in why else "valid JSON"
            return f"the request body is not {kind}: {why}", None
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if not loc and e.get("type") in ("model_type", "dict_type"):
            return f"the request body must be a JSON object of fields, got {type(e.get('input')).__name__}", None
        field = loc[0] if loc else "body"
        param = param or field
        union = next((f for f in loc if f in UNION_FIELDS), None)
        if union and loc[-1] != union:
            parts.append(f"{'.'.join(loc[:loc.index(union) + 1])} must be {UNION_FIELDS[union]}")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {e['msg']}")
    return "invalid request: " + "; ".join(list(dict.fromkeys(parts))[:6]), param


def parse_json(raw: bytes, schema: type[BaseModel]):
    """A request body -> ``schema`` instance, or RequestError(400) naming the problem (invalid UTF-8 or JSON,
    nesting too deep, a wrong field). CPU work for large bodies: call it off the event loop."""
    if not raw.strip():
        raise RequestError(400, "the request body is empty: send a JSON object")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise RequestError(400, message, param) from None
