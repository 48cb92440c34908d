"""The server under bad or heavy input, on a real uvicorn: body limits, a huge prompt next to /health, abandoned
requests, batch neighbours that must not break each other, tiny positive sampling values, and the Host check.
"""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from test_server import PROMPT, live_server

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea.serve import Limits, create_app
from bwarea.serve.app import allowed_hosts_for


@pytest.fixture
def served(tiny_model_dir):
    model = BWAreaForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, load_tokenizer(tiny_model_dir)


def wait_until(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ----- 1. bodies: a limit, and nothing big on the event loop --------------------------------------------------
def test_a_body_over_the_limit_gets_413_whether_its_size_is_declared_or_not(served):
    app = create_app(*served, Limits(max_body_bytes=2000))
    body = json.dumps({"prompt": "word " * 1000}).encode()
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        declared = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert "at most 2000" in error_of(declared, 413)["message"]
        chunked = http.post("/v1/completions", content=iter([body[:1500], body[1500:]]),
                            headers={"Content-Type": "application/json"})
        assert "over 2000 bytes" in error_of(chunked, 413)["message"]
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_a_10_mb_prompt_does_not_stall_health(served):
    app = create_app(*served, Limits(max_body_bytes=16 << 20))
    big = json.dumps({"prompt": "word " * 2_100_000, "max_tokens": 4}).encode()  # 10.5 MB
    result = {}
    with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        sender = threading.Thread(target=lambda: result.update(response=httpx.post(
            f"{base}/v1/completions", content=big, headers={"Content-Type": "application/json"}, timeout=60)))
        start = time.monotonic()
        sender.start()
        slowest = 0.0
        while sender.is_alive():
            t = time.monotonic()
            assert http.get("/health").status_code == 200
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.02)
        took = time.monotonic() - start
    error = error_of(result["response"], 400)
    assert "more than 124 tokens" in error["message"] and error["param"] == "prompt"
    print(f"slowest /health {slowest:.3f} s, big request {took:.2f} s")
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the big prompt was handled ({took:.1f} s)"
    assert took < 20


def test_too_many_prompts_are_refused_before_tokenising(served):
    app = create_app(*served, Limits(max_batch=8))
    with live_server(app) as base:
        start = time.monotonic()
        response = httpx.post(f"{base}/v1/completions", json={"prompt": ["a"] * 150_000}, timeout=60)
        took = time.monotonic() - start
    assert "150000 prompts x 1 samples is 150000 sequences" in error_of(response, 400)["message"]
    assert took < 5


# ----- 2. an abandoned non-streaming request stops generating --------------------------------------------------
def test_a_client_that_gives_up_on_a_non_streaming_request_frees_the_worker(served):
    app = create_app(*served, Limits(max_tokens=100))
    engine = app.state.engine
    finished = []
    choices = engine._choices

    def spy(job, rows):  # what the worker did with each row
        finished.extend((r.finish, len(r.token_ids)) for r in rows)
        return choices(job, rows)

    engine._choices = spy
    tickets = []
    submit = engine.submit
    engine.submit = lambda request: tickets.append(submit(request)) or tickets[-1]
    with live_server(app) as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "actions": 3}).encode()
        with engine.lock:  # the worker takes the job and waits for the model
            client = socket.create_connection((host, int(port)))
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until(lambda: engine.status()["requests"] == 1 and engine.status()["queued"] == 0, "not taken")
            client.close()  # the client gives up
            wait_until(lambda: tickets and tickets[0].cancelled, "the disconnect was not noticed")
        wait_until(lambda: finished, "the worker did not finish the job")
        assert httpx.get(f"{base}/health").json()["busy"] is False
    assert finished == [("cancelled", 0)]


# ----- 3. batch neighbours --------------------------------------------------------------------------------------
def test_a_long_prompt_and_a_long_generation_in_one_queue_both_succeed(served):
    """120 prompt tokens + 4 new fit the tiny model's 128 positions; 3 + 100 fit too. Padded into one batch they
    would need 220: they must not share a batch, and neither may fail because of the other."""
    model, tokenizer = served
    app = create_app(*served, Limits(max_tokens=100, max_batch=8))
    engine = app.state.engine
    long_prompt = [(i * 37) % 500 + 1 for i in range(120)]
    bodies = [{"prompt": long_prompt, "max_tokens": 4, "temperature": 0},
              {"prompt": "I like", "max_tokens": 100, "temperature": 0}]

    async def together(base):
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            with engine.lock:  # both wait in the queue, so the worker sees them together
                tasks = [asyncio.create_task(http.post("/v1/completions", json=b)) for b in bodies]
                while engine.status()["requests"] < 2:
                    await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

    with live_server(app) as base:
        responses = asyncio.run(together(base))
        alone = [httpx.post(f"{base}/v1/completions", json=b, timeout=60) for b in bodies]
    for response, reference in zip(responses, alone):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]


# ----- 4. tiny positive values -----------------------------------------------------------------------------------
def test_tiny_positive_sampling_values_work_and_invalid_ones_get_400(served):
    app = create_app(*served, Limits(max_tokens=8))
    body = {"prompt": PROMPT, "max_tokens": 6, "return_actions": True}
    with live_server(app) as base, httpx.Client(base_url=base, timeout=60) as http:  # one keep-alive connection
        def ok(**fields):
            response = http.post("/v1/completions", json={**body, **fields})
            assert response.status_code == 200, (fields, response.text)
            return response.json()["choices"][0]

        greedy = ok(temperature=0)
        for t in (1e-300, 1e-45, 1e-6):  # below 1e-5: the greedy limit
            assert ok(temperature=t)["token_ids"] == greedy["token_ids"]
        assert ok(temperature=1e-300, action_temperature=1e-300)["token_ids"] == greedy["token_ids"]
        sampled_actions = ok(temperature=0.7, action_temperature=1e-300, seed=3)
        assert sampled_actions["actions"] == ok(temperature=0.7, action_greedy=True, seed=3)["actions"]
        for penalty in (1e-300, 1e-45, 1e300):
            ok(repetition_penalty=penalty)
            ok(repetition_penalty=penalty, temperature=0)
        for raw, param in [('"temperature": -1e-300', "temperature"), ('"temperature": NaN', "temperature"),
                           ('"temperature": 1e999', "temperature"), ('"repetition_penalty": 0', "repetition_penalty"),
                           ('"action_temperature": -1', "action_temperature"), ('"top_p": 1e-400', "top_p")]:
            response = http.post("/v1/completions", content='{"prompt": "x", ' + raw + "}",
                                 headers={"Content-Type": "application/json"})
            assert error_of(response, 400)["param"] == param, raw
        assert ok(temperature=0)["token_ids"] == greedy["token_ids"]  # the connection still serves


# ----- 7. the Host check ------------------------------------------------------------------------------------------
def test_allowed_hosts_default_to_local_names_and_the_bound_host():
    assert allowed_hosts_for("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert allowed_hosts_for("0.0.0.0") == ["localhost", "127.0.0.1", "::1"]
    assert allowed_hosts_for("10.1.2.3") == ["localhost", "127.0.0.1", "::1", "10.1.2.3"]
    assert allowed_hosts_for("0.0.0.0", "myhost.lan, 10.1.2.3") == ["myhost.lan", "10.1.2.3"]
    with pytest.raises(ValueError, match="--allowed-hosts is empty"):
        allowed_hosts_for("127.0.0.1", " , ")


def test_requests_naming_another_host_are_refused(served):
    app = create_app(*served, Limits(), allowed_hosts=allowed_hosts_for("127.0.0.1"))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        port = base.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
            error = error_of(http.get("/health", headers={"Host": host}), 400)
            assert "is not allowed" in error["message"] and error["param"] == "host", host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert http.get("/health", headers={"Host": host}).status_code == 200, host
    anyone = create_app(*served, Limits(), allowed_hosts=["*"])
    with live_server(anyone) as base:
        assert httpx.get(f"{base}/health", headers={"Host": "evil.example"}).status_code == 200


# ----- what must keep working -------------------------------------------------------------------------------------
def test_64_concurrent_requests_are_all_served(served):
    app = create_app(*served, Limits(max_tokens=4, max_batch=8, queue_size=64))

    async def burst(base):
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json={
                "prompt": f"{i} I like", "max_tokens": 4, "stream": i % 2 == 0}) for i in range(64)])

    with live_server(app) as base:
        responses = asyncio.run(burst(base))
    assert [r.status_code for r in responses] == [200] * 64


def test_the_models_sampler_takes_the_greedy_limit_too(served):
    """Tiny temperatures and penalties reach generate from Python as well: they give the greedy limit, not NaNs."""
    import torch

    model, tokenizer = served
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, actions=5)
        for t in (1e-300, 1e-45):
            assert torch.equal(model.generate(ids, max_new_tokens=6, actions=5, do_sample=True, temperature=t), greedy)
        policy = model.generate(ids, max_new_tokens=6, action_greedy=True)
        assert torch.equal(model.generate(ids, max_new_tokens=6, action_greedy=False, action_temperature=1e-300),
                           policy)
        for penalty in (1e-300, 1e300):
            out = model.generate(ids, max_new_tokens=6, do_sample=True, repetition_penalty=penalty,
                                 generator=torch.Generator().manual_seed(0))
            assert out.shape == (1, ids.shape[1] + 6)


@pytest.mark.parametrize("flags, message", [
    (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
    (["--allowed-hosts", " , "], "--allowed-hosts is empty"),
])
def test_serve_flags_are_checked_before_the_model_loads(flags, message, capsys):
    from bwarea.cli import main

    assert main(["serve", "--model", "/nonexistent-model", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
