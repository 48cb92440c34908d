"""The OpenAI routes: POST /v1/completions (with an optional ``search`` object) and POST /v1/chat/completions.

Both validate everything that needs no tokenizer first (limits, sizes, field combinations), then tokenise off
the event loop, queue the job on the engine and wait for it, dropping its rows if the client goes away. A
completion with ``search`` runs ``bwarea.search.search`` as one call on the engine's worker, in turn with
generation, under the server's search limits (budget, max_tokens, time).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..generation import GREEDY_BELOW
from ..rl.rewards import Reward, RewardError, RewardSet, RewardTimeout
from ..search import search
from .engine import Completion
from .schemas import (SEARCH_OPTION_METHODS, ChatRequest, CompletionRequest, RequestError, SamplingFields,
                      error_body)
from ..display import TextStream
from ..generation.controls import check_request

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
        if body.search is not None:
            return await search_completion(body, request)
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

    async def search_completion(body: CompletionRequest, request: Request) -> dict:
        """A completion found by searching over actions for what a server reward scores highest."""
        options = body.search
        check_search_fields(body)
        reward_name, reward_fn = server.search_reward(options.reward)
        if body.max_tokens > limits.max_tokens:
            raise RequestError(400, f"max_tokens {body.max_tokens} is above this server's limit {limits.max_tokens} "
                               "(bwarea serve --max-tokens)", "max_tokens")
        if body.max_tokens < 1:
            raise RequestError(400, "max_tokens 0 writes nothing to search over: a search needs max_tokens >= 1",
                               "max_tokens")
        if options.budget > limits.max_search_budget:
            raise RequestError(400, f"search.budget {options.budget} is above this server's limit "
                               f"{limits.max_search_budget} world-model token evaluations "
                               "(bwarea serve --max-search-budget)", "search.budget")
        if options.budget < body.max_tokens:
            raise RequestError(400, f"search.budget {options.budget} is below max_tokens {body.max_tokens}: every "
                               "search first writes the policy's greedy sequence, so the budget must pay for at "
                               "least that", "search.budget")
        method_options = {}
        for name in sorted(options.model_fields_set - {"method", "budget", "reward"}):
            value = getattr(options, name)
            if value is None:
                continue
            if SEARCH_OPTION_METHODS[name] != options.method:
                raise RequestError(400, f"search.{name} is an option of method {SEARCH_OPTION_METHODS[name]!r}, not "
                                   f"of {options.method!r}: leave it out or change search.method", f"search.{name}")
            method_options[name] = value
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError(400, f"a search takes one prompt; this request has {len(prompt)}: send one "
                                   "request per prompt", "prompt")
            prompt = prompt[0]
        ids = await asyncio.to_thread(server.prompt_ids, prompt, body.max_tokens)
        # The search's own default is 0 (argmax tokens: a search over actions alone), not OpenAI's 1.
        temperature = body.temperature if "temperature" in body.model_fields_set else 0.0
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature
        seed = None if body.seed is None else body.seed % 2**64  # as torch reads a negative seed
        stop = threading.Event()
        run = search_job(ids, reward_name, reward_fn, options, method_options, body.max_tokens, temperature, seed,
                         body.return_actions, stop)
        found = await server.call(run, request, stop)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_id}
        written = len(found["token_ids"])
        return {**meta, "choices": [found["choice"]], "usage": {
            "prompt_tokens": len(ids), "completion_tokens": written, "total_tokens": len(ids) + written},
            "search": found["search"]}

    def search_job(ids, reward_name, reward_fn, options, method_options, max_tokens, temperature, seed,
                   return_actions, stop: threading.Event):
        """The function the worker runs: the search, then the choice and the ``search`` field of the response.

        The search stops at its next paid step or reward call once its client has gone (``stop``) or its time is
        up; a reward call itself is abandoned after the time limit (RewardSet's timeout).
        """
        timeout = limits.search_timeout
        over_time = RequestError(400, f"the search ran past this server's time limit of {timeout:g} s (bwarea "
                                 "serve --search-timeout); ask for a smaller search.budget or max_tokens", "search")
        gone = RequestError(499, "the client closed the connection before the search finished")

        def run() -> dict:
            deadline = time.monotonic() + timeout

            def check() -> None:
                if stop.is_set():
                    raise gone
                if time.monotonic() > deadline:
                    raise over_time

            def reward(prompts, completions, **kwargs):
                check()  # RewardSet reports what a reward raises as a RewardError, sorted out below
                return reward_fn(prompts=prompts, completions=completions, **kwargs)

            rewards = RewardSet([Reward(reward_name, reward)], timeout=timeout)
            try:
                result = search(server.model, torch.tensor(ids), tokenizer=server.tokenizer, reward=rewards,
                                method=options.method, budget=options.budget, max_new_tokens=max_tokens, seed=seed,
                                temperature=temperature, progress=lambda spent, budget: check(), **method_options)
            except RewardError as err:
                check()  # stopped by the client or the clock: say so, rather than blame the reward
                if isinstance(err, RewardTimeout):
                    raise over_time from None
                # The server's reward failed, not the request.
                raise RequestError(500, f"the search reward {reward_name!r} failed: {err}", "search") from err
            except ValueError as err:  # search arguments that do not fit together (e.g. n too large for budget)
                raise RequestError(400, f"search: {err}", "search") from err
            return {"choice": search_choice(result, ids, return_actions), "token_ids": result.completion_ids,
                    "search": search_field(result, reward_name)}

        return run

    def search_choice(result, ids: list[int], return_actions: bool) -> dict:
        """The searched completion as a completions choice (EOS, when written, adds no text, as in generation)."""
        eos = server.model.config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        token_ids = result.completion_ids
        finish = "stop" if token_ids and token_ids[-1] in eos else "length"
        choice = {"index": 0, "text": result.completion, "logprobs": None, "finish_reason": finish}
        if return_actions:
            stream = TextStream(server.tokenizer, ids)
            pieces = ["" if t in eos else stream.piece(t) for t in token_ids]
            # The policy's log-probability of each chosen action (temperature 1), as generation reports it.
            seq = torch.tensor([result.sequence], device=server.model.device)
            logp = torch.log_softmax(server.model.policy_logits(seq)[0].float(), dim=-1)
            action_logprobs = [float(logp[len(ids) - 1 + t, a]) for t, a in enumerate(result.actions)]
            choice.update(tokens=pieces, token_ids=token_ids, actions=result.actions, action_logprobs=action_logprobs)
        return choice

    def search_field(result, reward_name: str) -> dict:
        st = result.stats
        return {"method": result.method, "reward_name": reward_name, "reward": result.reward,
                "actions": result.actions,
                "greedy": {"text": result.greedy_completion, "actions": result.greedy_actions,
                           "reward": result.greedy_reward},
                "stats": {"evaluations": st.evaluations, "budget": st.budget, "nodes": st.nodes, "rounds": st.rounds,
                          "fanouts": st.fanouts, "sequences": st.sequences, "seconds": round(st.wall_time, 4)},
                "top": result.top}

    def check_search_fields(body: CompletionRequest) -> None:
        """Fields a search does not apply are refused by name, never ignored."""
        for name, why in SEARCH_REFUSES.items():
            value = getattr(body, name)
            if value != CompletionRequest.model_fields[name].default and not (name == "best_of" and value == 1):
                raise RequestError(400, f"{name} cannot be used with search: {why}", name)

    def check_sampling(body: SamplingFields) -> None:
        """Checks both routes share, none of which needs the tokenizer."""
        if body.stream_options is not None and not body.stream:
            raise RequestError(400, "stream_options is only for streamed responses: set stream true or leave "
                               "stream_options out", "stream_options")
        if body.n > limits.max_n:
            raise RequestError(400, f"n {body.n} is above this server's limit {limits.max_n}", "n")
        try:
            check_request(server.num_actions, body.actions, None)
        except ValueError as err:
            raise RequestError(400, str(err), "actions")
        try:
            check_request(server.num_actions, body.actions, body.allowed_actions)
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
        elif action_temperature is None and not action_greedy:
            # The model's own, named here so this request batches with those that name the same value.
            action_temperature = server.model.action_temperature
        return Completion(
            prompts=ids, max_tokens=max_tokens, n=body.n, stop=stop,
            temperature=temperature, top_p=body.top_p, top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None, seed=body.seed,
            actions=body.actions, allowed_actions=body.allowed_actions, action_greedy=action_greedy,
            action_temperature=action_temperature, stream=body.stream, **fields)

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


# Completion fields a search request must leave at their defaults, and why.
_TOKEN_SAMPLING = ("the search writes each token by argmax under its action (or samples it at `temperature`), so "
                   "this sampling control would not apply")
_ACTIONS = "the search chooses the actions; steer it with the options in the search object"
SEARCH_REFUSES = {
    "n": "a search returns one completion, the best it found; leave n at 1",
    "best_of": "a search already keeps its best completion, by the reward; leave best_of out",
    "stream": "the best completion is known only when the search ends; ask without stream",
    "stream_options": "a search is not streamed",
    "echo": "not offered with search; ask for the prompt's logprobs in a separate request",
    "logprobs": "not offered with search; score the returned text with echo and max_tokens 0 in a separate request",
    "stop": "the search scores whole completions of max_tokens tokens (or up to EOS); stop strings are not applied",
    "top_p": _TOKEN_SAMPLING, "top_k": _TOKEN_SAMPLING, "repetition_penalty": _TOKEN_SAMPLING,
    "frequency_penalty": _TOKEN_SAMPLING, "presence_penalty": _TOKEN_SAMPLING, "logit_bias": _TOKEN_SAMPLING,
    "actions": _ACTIONS, "allowed_actions": _ACTIONS, "action_temperature": _ACTIONS, "action_greedy": _ACTIONS,
}


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
