"""The OpenAI routes: POST /v1/completions and POST /v1/chat/completions.

Both validate everything that needs no tokenizer first (limits, sizes, field combinations), then tokenise off
the event loop, queue the job on the engine and wait for it, dropping its rows if the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..generation import GREEDY_BELOW
from .engine import Completion
from .schemas import ChatRequest, CompletionRequest, RequestError, SamplingFields, error_body
from .views import check_action_options

# A base model has no chat format of its own: messages become role lines and the model continues after
# "Assistant:"; a new role line ends its turn.
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ["\nUser:", "\nSystem:", "\nAssistant:"]


def chat_prompt(messages) -> str:
    """Chat messages -> the text the model continues: "System: ...\\nUser: ...\\nAssistant:"."""
    lines = []
    for m in messages:
        text = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        lines.append(f"{CHAT_ROLES[m.role]}: {text}")
    return "\n".join(lines) + "\nAssistant:"


def register(app, server) -> None:
    """Add the OpenAI routes to ``app``; ``server`` (app.py's Server) holds the model, engine and limits."""
    limits = server.limits

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await server.read(request, CompletionRequest)
        server.check_model(body.model)
        check_sampling(body)
        if body.suffix is not None:
            raise RequestError(400, "suffix is not supported: BWArea writes left to right and cannot fill in text "
                               "before a suffix; send suffix null or leave it out", "suffix")
        if body.max_tokens > limits.max_tokens:
            raise RequestError(400, f"max_tokens {body.max_tokens} is above this server's limit {limits.max_tokens}",
                               "max_tokens")
        if body.max_tokens == 0 and not body.echo:
            raise RequestError(400, "max_tokens 0 generates nothing: it needs echo true, which returns the prompt "
                               "(with its logprobs when logprobs is set)", "max_tokens")
        samples = body.best_of or body.n
        if body.best_of is not None and body.best_of < body.n:
            raise RequestError(400, f"best_of {body.best_of} is below n {body.n}: best_of samples are drawn and the "
                               "n with the highest mean token logprob are returned", "best_of")
        if body.stream and samples > body.n:
            raise RequestError(400, "best_of > n cannot be streamed: the samples are ranked once all are finished",
                               "best_of")
        if body.stream and body.echo:
            raise RequestError(400, "echo cannot be streamed; ask without stream", "echo")
        if body.logprobs is not None and body.logprobs > min(5, limits.max_top_k):
            raise RequestError(400, f"logprobs {body.logprobs} is above the limit {min(5, limits.max_top_k)}",
                               "logprobs")
        if body.logprobs is not None and body.stream:
            raise RequestError(400, "logprobs are computed after generation and cannot be streamed; "
                               "ask without stream", "logprobs")
        # A list of strings or of id lists is several prompts; a list of ints (or an empty list) is one prompt.
        prompt = body.prompt
        several = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
        prompts = prompt if several else [prompt]
        server.check_rows(len(prompts), samples, "best_of" if samples > body.n else "n")
        ids = await asyncio.to_thread(lambda: [server.prompt_ids(p, body.max_tokens) for p in prompts])
        job = completion_job(body, ids, body.max_tokens, stop_list(body), best_of=body.best_of, echo=body.echo,
                             logprobs=body.logprobs)
        ticket = server.engine.submit(job)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_id}
        if body.stream:
            return StreamingResponse(stream_completion(ticket, body, job, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await server.wait(ticket, request)
        return {**meta, "choices": [choice_json(c, body) for c in choices], "usage": usage(job, choices)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await server.read(request, ChatRequest)
        server.check_model(body.model)
        check_sampling(body)
        if body.logprobs or body.top_logprobs is not None:
            raise RequestError(400, "logprobs are not offered on /v1/chat/completions; use /v1/completions with "
                               "logprobs (and echo for the prompt's)", "logprobs" if body.logprobs else "top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError(400, "give max_completion_tokens or max_tokens, not both", "max_tokens")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise RequestError(400, f"max_tokens {asked} is above this server's limit {limits.max_tokens}",
                               "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        server.check_rows(1, body.n, "n")
        text = chat_prompt(body.messages)
        ids = await asyncio.to_thread(server.prompt_ids, text, asked or 1)
        # Without a limit the answer may fill the server's max_tokens or what is left of the context.
        max_tokens = asked or min(limits.max_tokens, server.context - len(ids))
        job = completion_job(body, [ids], max_tokens, stop_list(body) + CHAT_STOPS)
        ticket = server.engine.submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}
        if body.stream:
            return StreamingResponse(stream_chat(ticket, body, job, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await server.wait(ticket, request)
        return {**meta, "object": "chat.completion", "usage": usage(job, choices), "choices": [
            {"index": c["index"], "message": {"role": "assistant", "content": c["text"].lstrip()}, "logprobs": None,
             "finish_reason": c["finish_reason"]} for c in choices]}

    def check_sampling(body: SamplingFields) -> None:
        """Checks both routes share, none of which needs the tokenizer."""
        if body.stream_options is not None and not body.stream:
            raise RequestError(400, "stream_options is only for streamed responses: set stream true or leave "
                               "stream_options out", "stream_options")
        if body.n > limits.max_n:
            raise RequestError(400, f"n {body.n} is above this server's limit {limits.max_n}", "n")
        try:
            check_action_options(server.num_actions, body.actions, None)
        except ValueError as err:
            raise RequestError(400, str(err), "actions")
        try:
            check_action_options(server.num_actions, body.actions, body.allowed_actions)
        except ValueError as err:
            raise RequestError(400, str(err), "allowed_actions")
        for key in body.logit_bias or {}:
            if not key.isdigit() or not int(key) < server.vocab_size:
                raise RequestError(400, f"logit_bias key {key!r} is not a token id in [0, {server.vocab_size})",
                                   "logit_bias")

    def completion_job(body: SamplingFields, ids: list[list[int]], max_tokens: int, stop: list[str],
                       **fields) -> Completion:
        if isinstance(body.actions, list) and len(body.actions) > max_tokens:
            raise RequestError(400, f"the action schedule has {len(body.actions)} entries but at most {max_tokens} "
                               "tokens are generated", "actions")
        # The sampler's greedy limit, applied here too so such requests batch with greedy ones and get argmax
        # actions by default, as temperature 0 does.
        temperature = 0.0 if body.temperature < GREEDY_BELOW else body.temperature
        action_temperature = body.action_temperature
        # temperature 0 is argmax tokens; unless told otherwise its actions are argmax too, so it is deterministic.
        action_greedy = body.action_greedy if body.action_greedy is not None else (
            temperature == 0 and action_temperature is None)
        if action_temperature is not None and action_temperature < GREEDY_BELOW:
            action_greedy, action_temperature = True, None
        return Completion(
            prompts=ids, max_tokens=max_tokens, n=body.n, stop=stop,
            temperature=temperature, top_p=body.top_p, top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None, seed=body.seed,
            actions=body.actions, allowed_actions=body.allowed_actions, action_greedy=action_greedy,
            action_temperature=action_temperature or 1.0, stream=body.stream, **fields)

    async def stream_completion(ticket, body: CompletionRequest, job: Completion, meta: dict):
        sent = {}  # choice index -> characters of text streamed so far
        try:
            async for kind, payload in events(ticket):
                if kind == "token":
                    index, shown, token, action, piece = payload
                    sent[index] = sent.get(index, 0) + len(shown)
                    choice = {"index": index, "text": shown, "logprobs": None, "finish_reason": None}
                    if body.return_actions and token is not None:
                        choice.update(tokens=[piece], token_ids=[token], actions=[action])
                    yield sse({**meta, "choices": [choice]})
                elif kind == "done":
                    for c in payload:
                        choice = {"index": c["index"], "text": c["text"][sent.get(c["index"], 0):], "logprobs": None,
                                  "finish_reason": c["finish_reason"]}
                        if body.return_actions:
                            choice["action_logprobs"] = c["action_logprobs"]
                        yield sse({**meta, "choices": [choice]})
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse({**meta, "choices": [], "usage": usage(job, payload)})
                else:
                    yield sse(stream_error(payload))
            yield "data: [DONE]\n\n"
        finally:
            ticket.cancel()  # a client that went away stops its rows at the next step

    async def stream_chat(ticket, body: ChatRequest, job: Completion, meta: dict):
        meta = {**meta, "object": "chat.completion.chunk"}
        started = {}  # choice index -> whether text other than leading whitespace was sent

        def chunk(index, delta, finish=None):
            return sse({**meta, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]})

        try:
            for index in range(job.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            sent = {}
            async for kind, payload in events(ticket):
                if kind == "token":
                    index, shown = payload[0], payload[1]
                    sent[index] = sent.get(index, 0) + len(shown)
                    if not started.get(index):
                        shown = shown.lstrip()
                        started[index] = bool(shown)
                    if shown:
                        yield chunk(index, {"content": shown})
                elif kind == "done":
                    for c in payload:
                        rest = c["text"][sent.get(c["index"], 0):]
                        rest = rest if started.get(c["index"]) else rest.lstrip()
                        yield chunk(c["index"], {"content": rest} if rest else {}, c["finish_reason"])
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse({**meta, "choices": [], "usage": usage(job, payload)})
                else:
                    yield sse(stream_error(payload))
            yield "data: [DONE]\n\n"
        finally:
            ticket.cancel()

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


def stop_list(body: SamplingFields) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


async def events(ticket):
    """A streamed job's events until "done" or "error" (inclusive)."""
    while True:
        kind, payload = await ticket.events.get()
        yield kind, payload
        if kind != "token":
            return


def stream_error(err: Exception) -> dict:
    """An error after the stream started: it can only travel as an event."""
    if isinstance(err, ValueError):
        return error_body(400, str(err))
    return error_body(500, f"generation failed: {type(err).__name__}: {err}")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
