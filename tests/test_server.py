"""The HTTP server: OpenAI-compatible completions with action controls, /v1/actions, /v1/fanout, limits,
streaming, bad inputs, and concurrency against a real uvicorn on 127.0.0.1.

Expected numbers come from the model's forward pass (full recomputation), not from the serving code.
"""

import asyncio
import contextlib
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from bwarea import load_tokenizer
from bwarea.serve import Limits, create_app
from bwarea.display import TextStream, token_pieces

PROMPT = "I like eating"


@contextlib.contextmanager
def live_server(app, timeout: float = 30.0):
    """Run ``app`` on uvicorn in a thread, on a free port of 127.0.0.1 -> base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@torch.no_grad()
def greedy_reference(model, ids, steps, actions=None):
    """Argmax tokens and actions by full recomputation (inverse-dynamics actions on the prompt).
    actions: None (policy argmax) or a per-step schedule with -1 for the policy. -> (tokens, actions, logprobs)."""
    seq, acts = list(ids), model.infer_actions(torch.tensor([ids]))[0][0, :-1].tolist()
    tokens, chosen, logprobs = [], [], []
    for step in range(steps):
        x = torch.tensor([seq])
        a = actions[step] if actions is not None and step < len(actions) and actions[step] >= 0 else -1
        if a < 0:
            a = int(model.policy_logits(x)[0, -1].argmax())
        lp = torch.log_softmax(model(x, action_idx=torch.tensor([acts + [a]])).logits[0, -1], -1)
        token = int(lp.argmax())
        tokens.append(token), chosen.append(a), logprobs.append(float(lp[token]))
        seq.append(token), acts.append(a)
        if token == model.config.eos_token_id:
            break
    return tokens, chosen, logprobs


def complete(client, **body):
    response = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(lines) -> list:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ----- what people see: token pieces and streamed text ------------------------------------------------------
@pytest.mark.parametrize("text", [PROMPT, "The  king said:\n\"no\".", "héllo wörld"])
def test_token_pieces_join_to_the_decoded_text(tiny_model_dir, text):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(text)["input_ids"]
    assert "".join(token_pieces(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_it(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer("A the cat sat")["input_ids"]
    prompt, continuation = ids[:3], ids[3:]
    expected = tokenizer.decode(ids, skip_special_tokens=True)[len(tokenizer.decode(prompt, skip_special_tokens=True)):]
    assert "cat" in expected
    stream = TextStream(tokenizer, prompt, stop=["cat"])
    shown = "".join(stream.push(t)[1] for t in continuation)
    assert stream.stopped and stream.text == shown == expected[:expected.index("cat")]
    stream, shown, held = TextStream(tokenizer, prompt, stop=["cats"]), "", False
    for t in continuation:
        shown += stream.push(t)[1]
        if stream.text and "cats".startswith(stream.text[-3:].lstrip()):
            held = held or shown == ""  # "c", "ca" or "cat" could still become "cats": not shown yet
    assert held and not stream.stopped and shown + stream.flush() == expected


# ----- metadata ----------------------------------------------------------------------------------------------
def test_models_health_and_page(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["num_actions"] == 64 and models["data"][0]["max_model_len"] == 128
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # Offline: the page and its assets load nothing from other hosts.
    for path in ("/", "/static/explorer.js", "/static/style.css"):
        body = client.get(path)
        assert body.status_code == 200
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", body.text)
        assert "http://" not in body.text and "https://" not in body.text


def test_a_request_without_action_temperature_gets_the_models(served):
    """/v1/models reports the model's action temperature (config.action_temperature), and a completion that names
    none samples its actions there: the same actions as one that names it, other actions than one at 1."""
    from fastapi.testclient import TestClient
    from bwarea.serve import Limits, create_app
    model, tokenizer = served
    model.config.action_temperature = 0.3
    cool = type(model)(model.config).eval()
    cool.load_state_dict(model.state_dict())
    with TestClient(create_app(cool, tokenizer, Limits(max_tokens=32), model_id="cool")) as client:
        assert client.get("/v1/models").json()["data"][0]["action_temperature"] == 0.3
        body = dict(max_tokens=16, seed=5, return_actions=True)
        actions = {t: complete(client, **body, **({} if t is None else {"action_temperature": t}))
                   ["choices"][0]["actions"] for t in (None, 0.3, 1.0)}
    assert actions[None] == actions[0.3] != actions[1.0]


# ----- completions -------------------------------------------------------------------------------------------
def test_greedy_completion_matches_recomputation(client, served):
    model, tokenizer = served
    result = complete(client, max_tokens=8, temperature=0, return_actions=True)
    ids = tokenizer(PROMPT)["input_ids"]
    tokens, actions, _ = greedy_reference(model, ids, 8)
    choice = result["choices"][0]
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "tiny" and isinstance(result["created"], int)
    assert choice["token_ids"] == tokens and choice["actions"] == actions
    assert choice["text"] == tokenizer.decode(ids + tokens, skip_special_tokens=True)[len(PROMPT):]
    assert "".join(choice["tokens"]) == choice["text"]
    assert choice["finish_reason"] == ("stop" if tokens[-1] == model.config.eos_token_id else "length")
    assert result["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                               "total_tokens": len(ids) + len(tokens)}
    # Each action's log-prob under the policy (temperature 1), recomputed.
    with torch.no_grad():
        seq = torch.tensor([ids + tokens])
        policy = torch.log_softmax(model.policy_logits(seq)[0], -1)
    expected = [float(policy[len(ids) - 1 + j, a]) for j, a in enumerate(actions)]
    assert choice["action_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_logprobs_are_the_language_models_mixture(client, served):
    """A generated token's logprob is BWArea's next-token mixture over actions at its position (what
    lm_log_likelihood scores), not the world model under the action that happened to produce it."""
    model, tokenizer = served
    choice = complete(client, max_tokens=6, temperature=0, actions=[3, -1, 5], logprobs=3,
                      return_actions=True)["choices"][0]
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model.lm_log_likelihood(torch.tensor([ids + choice["token_ids"]]))[0, len(ids) - 1:].tolist()
    lp = choice["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert len(lp["top_logprobs"]) == len(choice["token_ids"]) and all(len(t) <= 3 for t in lp["top_logprobs"])
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == choice["text"]


def test_fixed_action_schedule_and_allowed_actions(client):
    fixed = complete(client, max_tokens=5, actions=9, return_actions=True, seed=0)["choices"][0]
    assert fixed["actions"] == [9] * len(fixed["token_ids"])
    scheduled = complete(client, max_tokens=6, actions=[3, -1, 5], allowed_actions=[3, 5, 10, 11], seed=0,
                         return_actions=True)["choices"][0]
    actions = scheduled["actions"]
    assert actions[0] == 3 and actions[2] == 5 and set(actions[1:2] + actions[3:]) <= {3, 5, 10, 11}


def test_n_prompts_and_seeds(client):
    body = dict(prompt=["I like", "The king"], n=2, max_tokens=6, temperature=1.5, seed=11)
    first, again = complete(client, **body), complete(client, **body)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    other = complete(client, **{**body, "seed": 12})
    assert [c["text"] for c in other["choices"]] != [c["text"] for c in first["choices"]]


def test_stop_string_cuts_the_text(client):
    text = complete(client, max_tokens=16, temperature=0, actions=7)["choices"][0]["text"]
    stop = text.strip()[1:3]
    assert len(stop) == 2, f"greedy text {text!r} too short to pick a stop string from"
    choice = complete(client, max_tokens=16, temperature=0, actions=7, stop=[stop, "\u2603"])["choices"][0]
    assert choice["text"] == text[:text.index(stop)] and choice["finish_reason"] == "stop"


def test_streaming_sends_tokens_with_actions_and_ends_with_done(client):
    plain = complete(client, max_tokens=10, temperature=0, return_actions=True)["choices"][0]
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True, "return_actions": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(list(response.iter_lines()))
    token_chunks = [c for c in chunks if c["choices"] and "token_ids" in c["choices"][0]]
    assert len(token_chunks) == len(plain["token_ids"])  # one event per generated token, as it is made
    assert [c["choices"][0]["token_ids"][0] for c in token_chunks] == plain["token_ids"]
    assert [c["choices"][0]["actions"][0] for c in token_chunks] == plain["actions"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["text"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(plain["token_ids"])


# ----- BWArea endpoints --------------------------------------------------------------------------------------
def test_actions_endpoint_labels_each_token(client, served):
    model, tokenizer = served
    result = client.post("/v1/actions", json={"prompt": PROMPT}).json()
    ids = tokenizer(PROMPT)["input_ids"]
    index = model.infer_actions(torch.tensor([ids]))[0][0].tolist()
    assert [t["id"] for t in result["tokens"]] == ids
    assert [t["action"] for t in result["tokens"]] == [None] + index[:-1]
    by_ids = client.post("/v1/actions", json={"prompt": ids}).json()
    assert by_ids["tokens"] == result["tokens"]


def test_fanout_endpoint_matches_one_forward_per_action(client, served):
    model, tokenizer = served
    result = client.post("/v1/fanout", json={"prompt": PROMPT, "top_k": 2, "actions": [0, 33, 63]}).json()
    assert result["prompt_tokens"] == len(tokenizer(PROMPT)["input_ids"])
    assert sum(result["policy"]) == pytest.approx(1, abs=1e-4)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    inverse = model.infer_actions(ids)[0]
    for row in result["actions"]:
        actions = inverse.clone()
        actions[0, -1] = row["action"]
        with torch.no_grad():
            lp = torch.log_softmax(model(ids, action_idx=actions).logits[0, -1], -1)
        lp[len(tokenizer) - 1:] = -float("inf")  # pad and unused slots are not listed
        assert [t["id"] for t in row["top"]] == lp.topk(2).indices.tolist()
        assert row["policy_prob"] == pytest.approx(result["policy"][row["action"]])


# ----- bad input: a 4xx with a message, never a 500 --------------------------------------------------------
BAD = [
    ("{", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"prompt": 5}', "prompt must be a string"),
    ('{"max_tokens": 4}', "prompt: Field required"),
    ('{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": 1.5}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": 0}', "needs echo true"),
    ('{"prompt": "x", "max_tokens": -1}', "greater than or equal to 0"),
    ('{"prompt": "x", "max_tokens": 33}', "above this server's limit 32"),
    ('{"prompt": "x", "n": 5}', "n 5 is above"),
    ('{"prompt": ["a", "b", "c"], "n": 4}', "at most 8 together"),
    ('{"prompt": "x", "temperature": -0.5}', "temperature"),
    ('{"prompt": "x", "top_p": 0}', "top_p"),
    ('{"prompt": "x", "stream": "yes"}', "stream"),
    ('{"prompt": "x", "frequency_penalty": 3}', "frequency_penalty: Input should be less than or equal to 2"),
    ('{"prompt": "x", "best_of_all": 1}', "best_of_all: Extra inputs"),
    ('{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "up to 4 strings"),
    ('{"prompt": "x", "actions": 64}', "action 64 is outside"),
    ('{"prompt": "x", "actions": [1, -2]}', "schedule entry -2"),
    ('{"prompt": "x", "actions": [1, 2, 3], "max_tokens": 2}', "3 entries"),
    ('{"prompt": "x", "actions": "7"}', "actions must be"),
    ('{"prompt": "x", "allowed_actions": []}', "allowed_actions is empty"),
    ('{"prompt": "x", "allowed_actions": [70]}', "allowed action 70"),
    ('{"prompt": "x", "allowed_actions": [1, 2], "actions": [1, 3]}', "action 3 is fixed"),
    ('{"prompt": "x", "action_temperature": 0}', "action_temperature"),
    ('{"prompt": "x", "logprobs": 9}', "logprobs 9"),
    ('{"prompt": "x", "logprobs": 1, "stream": true}', "cannot be streamed"),
    ('{"prompt": "' + "word " * 200 + '"}', "the limit is"),
    ('{"prompt": []}', "empty list"),
    ('{"prompt": [1, 99999]}', "outside the vocabulary"),
    ('{"prompt": [1, "a"]}', "prompt must be"),
    ('{"prompt": "\\udfff"}', "not valid Unicode"),
    ('{"prompt": "x", "seed": 1180591620717411303424}', "seed"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_completion_requests_get_400_with_a_message(client, body, message):
    response = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert message in response.json()["error"]["message"]


def test_other_bad_requests(client):
    wrong_model = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert wrong_model.status_code == 404 and "'tiny'" in wrong_model.json()["error"]["message"]
    for path, body, message in [
        ("/v1/fanout", {"prompt": "x", "top_k": 500}, "top_k 500"),
        ("/v1/fanout", {"prompt": "x", "actions": [64]}, "action 64"),
        ("/v1/fanout", {"prompt": "x", "actions": []}, "actions is empty"),
        ("/v1/fanout", {"prompt": ""}, None),  # an empty text is just BOS: fine
        ("/v1/actions", {"text": "x"}, "prompt: Field required"),
        ("/v1/actions", {"prompt": "word " * 200}, "the limit is"),
    ]:
        response = client.post(path, json=body)
        if message is None:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert client.get("/v1/completions").status_code == 405


def wait_until(engine, condition):
    """Poll ``condition`` until it holds (20 s at most; a timeout shows the engine's status)."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, engine.status()
        time.sleep(0.01)


def test_full_queue_gets_503_and_the_waiting_requests_complete(served):
    app = create_app(*served, Limits(max_tokens=8, queue_size=1, max_batch=1))
    engine = app.state.engine
    results = {}

    with live_server(app) as base:
        def send(name):
            results[name] = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=60)

        with engine.lock:  # the model is busy: the worker takes the first job and waits for it
            first = threading.Thread(target=send, args=("first",))
            first.start()
            wait_until(engine, lambda: engine.status()["requests"] == 1 and engine.status()["queued"] == 0)
            second = threading.Thread(target=send, args=("second",))
            second.start()
            wait_until(engine, lambda: engine.status()["queued"] == 1)
            send("third")
        first.join(30), second.join(30)
    assert results["third"].status_code == 503 and "busy" in results["third"].json()["error"]["message"]
    assert results["first"].status_code == 200 and results["second"].status_code == 200


# ----- a real server: concurrency ----------------------------------------------------------------------------
def test_16_concurrent_requests_on_a_real_server(served):
    app = create_app(*served, Limits(max_tokens=16, max_batch=8, queue_size=32))
    prompts = [f"{w} said" for w in ("The king", "A cat", "We", "I", "She", "They", "He", "You")] * 2

    async def one(http, i):
        body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0, "return_actions": True}
        if i % 2:  # half of them stream
            text, tokens = "", []
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                chunks = sse_events([line async for line in response.aiter_lines()])
            for chunk in chunks:
                text += chunk["choices"][0]["text"]
                tokens += chunk["choices"][0].get("token_ids", [])
            return text, tokens
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"], response.json()["choices"][0]["token_ids"]

    async def all_at_once(base):
        engine = app.state.engine
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            with engine.lock:  # the model is busy until all 16 have arrived, so they must share batches
                tasks = [asyncio.create_task(one(http, i)) for i in range(16)]
                deadline = time.monotonic() + 30
                while engine.status()["requests"] < 16:
                    assert time.monotonic() < deadline, engine.status()
                    await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

    with live_server(app) as base:
        results = asyncio.run(all_at_once(base))
        stats = httpx.get(f"{base}/health").json()
        # Each prompt alone, one after another: batching must not change argmax results.
        with httpx.Client(base_url=base, timeout=60) as http:
            alone = [http.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0})
                     .json()["choices"][0]["text"] for p in prompts[:8]]
    assert [r[0] for r in results] == alone + alone
    assert stats["largest_batch"] == 8, stats  # requests that waited together were generated together
    assert stats["batches"] <= 4 + 8  # 16 in batches, then the 8 sequential ones


def test_a_request_naming_the_models_action_temperature_batches_with_one_naming_none(served):
    """A request without action_temperature gets the model's, so it shares a batch with one that names that value."""
    app = create_app(*served, Limits(max_tokens=16, max_batch=8))
    engine = app.state.engine
    results = []

    with live_server(app) as base:
        def send(**extra):
            results.append(httpx.post(f"{base}/v1/completions", timeout=60, json={
                "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, **extra}))

        with engine.lock:  # the worker takes a first (greedy) job and waits; the two others queue behind it
            threads = [threading.Thread(target=send, kwargs={"temperature": 0})]
            threads[0].start()
            wait_until(engine, lambda: engine.status()["requests"] == 1 and engine.status()["queued"] == 0)
            for extra in ({}, {"action_temperature": served[0].action_temperature}):
                threads.append(threading.Thread(target=send, kwargs=extra))
                threads[-1].start()
            wait_until(engine, lambda: engine.status()["queued"] == 2)
        for t in threads:
            t.join(30)
        stats = httpx.get(f"{base}/health").json()
    assert [r.status_code for r in results] == [200] * 3
    assert stats["batches"] == 2 and stats["largest_batch"] == 2, stats


def test_a_slow_streaming_client_does_not_block_others(served):
    app = create_app(*served, Limits(max_tokens=64, max_batch=1))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as slow, \
            httpx.Client(base_url=base, timeout=30) as fast:
        body = {"prompt": PROMPT, "max_tokens": 64, "stream": True, "actions": 7}
        with slow.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # read one event, then stop reading
            start = time.monotonic()
            for _ in range(3):
                response = fast.post("/v1/completions", json={"prompt": "The king", "max_tokens": 4})
                assert response.status_code == 200
            assert time.monotonic() - start < 20
        # The slow client left: its rows are dropped and the worker is idle again.
        deadline = time.monotonic() + 20
        while fast.get("/health").json()["busy"] or fast.get("/health").json()["queued"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_cancelled_request_stops_generating(served):
    """What happens when a streaming client disconnects: the handler cancels its ticket; the worker drops its
    rows at the next step, and stops when no row is left."""
    from bwarea.serve.engine import Completion, Engine

    model, tokenizer = served
    engine = Engine(model, tokenizer, Limits())

    async def scenario():
        with engine.lock:  # the worker takes the job, then waits for the model
            ticket = engine.submit(Completion(prompts=[tokenizer(PROMPT)["input_ids"]], max_tokens=50, stream=True))
            deadline = time.monotonic() + 20
            while engine.status()["queued"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            ticket.cancel()
        while True:
            kind, payload = await asyncio.wait_for(ticket.events.get(), 30)
            if kind == "done":
                return payload

    try:
        choices = asyncio.run(scenario())
    finally:
        engine.close()
    assert choices[0]["finish_reason"] == "cancelled" and choices[0]["token_ids"] == []
    assert not model.get_action_info()["action_idx"]  # the worker clears the action record after each batch


def test_max_prompt_tokens_limit(served):
    with TestClient(create_app(*served, Limits(max_prompt_tokens=4))) as c:
        for path in ("/v1/completions", "/v1/actions", "/v1/fanout"):
            response = c.post(path, json={"prompt": PROMPT})
            assert response.status_code == 400
            assert "(this server's max_prompt_tokens)" in response.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "I", "max_tokens": 2}).status_code == 200
