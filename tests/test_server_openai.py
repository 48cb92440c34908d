"""The OpenAI API as clients use it: echo and logprobs (the language model's mixture), max_tokens 0, prompt
shapes, penalties and logit_bias, best_of, suffix, /v1/chat/completions through the openai client, the error
shape of every failure, and lm-eval's local-completions against a real server.

Expected numbers come from the model (``lm_log_likelihood``, ``generate``), not from the serving code.
"""

import json
import math

import httpx
import pytest
import torch
from conftest import tiny_config
from test_server import PROMPT, live_server
from transformers import LogitsProcessorList

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea.generation.processors import FrequencyPresencePenalty, LogitBias
from bwarea.serve import Limits, create_app
from bwarea.serve.openai_routes import chat_prompt
from bwarea.serve.schemas import ChatMessage
from bwarea.display import token_pieces


def post(client, **body):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def mixture(model, ids) -> list[float]:
    """log p(token i | tokens < i) for i >= 1, by the model's own scorer."""
    with torch.no_grad():
        return model.lm_log_likelihood(torch.tensor([ids]))[0].tolist()


# ----- echo, logprobs, max_tokens 0, prompt shapes ---------------------------------------------------------
def test_echo_with_max_tokens_0_scores_the_prompt(client, served):
    model, tokenizer = served
    prompts = [tokenizer(t)["input_ids"] for t in ("I like eating apples", "The king said unto them")]
    result = post(client, prompt=prompts, max_tokens=0, echo=True, logprobs=2)
    assert [c["index"] for c in result["choices"]] == [0, 1]
    for choice, ids in zip(result["choices"], prompts):
        lp = choice["logprobs"]
        assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert lp["tokens"] == token_pieces(tokenizer, ids) and "".join(lp["tokens"]) == choice["text"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(mixture(model, ids), abs=1e-4)
        # Each position's top alternatives come from the same distribution: none is below the chosen token
        # when the chosen token is among them, and there are at most 2.
        for top, chosen in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
            assert 1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-6
        offsets = [sum(len(p) for p in lp["tokens"][:i]) for i in range(len(ids))]
        assert lp["text_offset"] == offsets
    assert result["usage"]["completion_tokens"] == 0
    assert result["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_echo_with_generation_gives_prompt_and_new_tokens_the_same_scorer(client, served):
    model, tokenizer = served
    ids = tokenizer(PROMPT)["input_ids"]
    choice = post(client, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=1,
                  return_actions=True)["choices"][0]
    generated = choice["token_ids"]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + len(generated)
    assert lp["token_logprobs"][1:] == pytest.approx(mixture(model, ids + generated), abs=1e-4)
    assert choice["text"] == PROMPT + tokenizer.decode(ids + generated, skip_special_tokens=True)[len(PROMPT):]
    # Argmax tokens at temperature 0 under the token sampler need not be the mixture's argmax (the token is drawn
    # under one action), but the top alternative is the mixture's best.
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])


def test_every_prompt_shape_gives_the_same_completion(client, served):
    _, tokenizer = served
    ids = tokenizer(PROMPT)["input_ids"]
    body = dict(max_tokens=4, temperature=0)
    one = post(client, prompt=PROMPT, **body)["choices"]
    assert post(client, prompt=ids, **body)["choices"][0]["text"] == one[0]["text"]
    several = post(client, prompt=[PROMPT, "The king"], **body)["choices"]
    by_ids = post(client, prompt=[ids, tokenizer("The king")["input_ids"]], **body)["choices"]
    assert [c["text"] for c in several] == [c["text"] for c in by_ids] and several[0]["text"] == one[0]["text"]


def test_standard_fields_clients_send_by_default_are_accepted(client):
    result = post(client, prompt=PROMPT, max_tokens=3, frequency_penalty=0, presence_penalty=0, best_of=1, n=1,
                  user="someone", suffix=None, logit_bias={}, echo=False, logprobs=None, stream=False, stop=None)
    assert len(result["choices"]) == 1


@pytest.mark.parametrize("body, param, message", [
    ({"suffix": "end"}, "suffix", "suffix is not supported"),
    ({"max_tokens": 0}, "max_tokens", "needs echo true"),
    ({"best_of": 1, "n": 2}, "best_of", "best_of 1 is below n 2"),
    ({"best_of": 3, "stream": True}, "best_of", "cannot be streamed"),
    ({"echo": True, "stream": True}, "echo", "echo cannot be streamed"),
    ({"best_of": 3, "n": 1, "prompt": ["a", "b", "c"]}, "best_of", "3 prompts x 3 samples is 9 sequences"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "logit_bias key 'abc'"),
    ({"logit_bias": {"99999": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "less than or equal to 100"),
    ({"presence_penalty": -2.5}, "presence_penalty", "greater than or equal to -2"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only for streamed responses"),
    ({"allowed_actions": [70]}, "allowed_actions", "allowed action 70"),
    ({"allowed_actions": [1], "actions": 2}, "allowed_actions", "not among the allowed"),
    ({"actions": 70}, "actions", "action 70 is outside"),
])
def test_unservable_combinations_name_their_field(client, body, param, message):
    response = client.post("/v1/completions", json={"prompt": PROMPT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


# ----- penalties, logit_bias, best_of ----------------------------------------------------------------------------
def test_frequency_and_presence_penalty_follow_openais_definition():
    ids = torch.tensor([[7, 7, 1, 2, 2, 2, 5], [7, 7, 3, 3, 4, 9, 9]])  # prompt width 2: generated from column 2
    scores = torch.zeros(2, 10)
    out = FrequencyPresencePenalty(2, frequency=[0.5, 0.0], presence=[1.0, -0.25])(ids, scores.clone())
    expected = torch.zeros(2, 10)
    for token, count in {1: 1, 2: 3, 5: 1}.items():
        expected[0, token] = -(count * 0.5 + 1.0)
    for token in (3, 4, 9):  # frequency 0: only presence (negative: encouraged)
        expected[1, token] = 0.25
    assert torch.equal(out, expected)  # the prompt's 7s are not penalised
    bias = LogitBias([{3: -100.0, 4: 2.5}, {}], 10)(ids, torch.ones(2, 10))
    assert bias[0, 3] == -99 and bias[0, 4] == 3.5 and torch.equal(bias[1], torch.ones(10))


def test_penalties_and_logit_bias_change_sampling_as_generate_does(client, served):
    model, tokenizer = served
    ids = tokenizer(PROMPT)["input_ids"]
    plain = post(client, prompt=PROMPT, max_tokens=8, temperature=0, actions=7, return_actions=True)["choices"][0]
    banned = plain["token_ids"][0]
    biased = post(client, prompt=PROMPT, max_tokens=8, temperature=0, actions=7, return_actions=True,
                  logit_bias={str(banned): -100})["choices"][0]
    assert banned not in biased["token_ids"]
    forced = post(client, prompt=PROMPT, max_tokens=4, temperature=0, actions=7, return_actions=True,
                  logit_bias={"42": 100})["choices"][0]
    assert forced["token_ids"] == [42] * 4
    # The penalties reach the sampler: the same tokens as generate with OpenAI's penalty processor.
    penalised = post(client, prompt=PROMPT, max_tokens=8, temperature=0, actions=7, return_actions=True,
                     frequency_penalty=2, presence_penalty=1.5)["choices"][0]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, actions=7, action_greedy=True,
                             logits_processor=LogitsProcessorList([FrequencyPresencePenalty(len(ids), [2.0], [1.5])]))
    expected = out[0, len(ids):].tolist()
    assert penalised["token_ids"] == expected[:len(penalised["token_ids"])]
    assert len(set(plain["token_ids"])) < len(plain["token_ids"])  # greedy repeats itself here ...
    assert len(set(penalised["token_ids"])) == len(penalised["token_ids"])  # ... and the penalties stop it


def test_best_of_keeps_the_samples_with_the_best_mean_logprob(client, served):
    model, tokenizer = served
    ids = tokenizer(PROMPT)["input_ids"]
    body = dict(prompt=PROMPT, max_tokens=6, temperature=1.5, seed=5, return_actions=True)
    every = post(client, n=4, **body)["choices"]
    means = [sum(mixture(model, ids + c["token_ids"])[-len(c["token_ids"]):])
             / len(c["token_ids"]) for c in every]
    best = post(client, n=2, best_of=4, **body)["choices"]
    ranked = sorted(range(4), key=lambda i: -means[i])[:2]
    assert [c["index"] for c in best] == [0, 1]
    assert [c["token_ids"] for c in best] == [every[i]["token_ids"] for i in ranked]


# ----- errors: always {"error": {message, type, param, code}} -------------------------------------------------
@pytest.fixture(scope="module")
def live_base(released_dir):
    """One real uvicorn for the module: a tiny random model with the fixture's tokenizer."""
    torch.manual_seed(0)
    app = create_app(BWAreaForCausalLM(tiny_config()).eval(), load_tokenizer(released_dir), Limits(max_tokens=32),
                     model_id="tiny", allowed_hosts=["127.0.0.1"])
    with live_server(app) as base:
        yield base


@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/v1/nothing", None, 404, "no such endpoint: GET /v1/nothing"),
    ("POST", "/v1/chat/nothing", b"{}", 404, "no such endpoint"),
    ("GET", "/v1/completions", None, 405, "GET is not allowed on /v1/completions"),
    ("DELETE", "/v1/chat/completions", None, 405, "not allowed"),
    ("POST", "/v1/completions", b'{"prompt": "x"', 400, "not valid JSON"),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "not valid Unicode text"),
    ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "recursion limit"),
    ("POST", "/v1/completions", b"", 400, "the request body is empty"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
    ("POST", "/v1/actions", b"[]", 400, "must be a JSON object"),
    ("POST", "/v1/fanout", b'{"prompt": "x", "top_k": 0}', 400, "top_k"),
])
def test_every_error_has_the_openai_shape(live_base, method, path, body, status, message):
    response = httpx.request(method, f"{live_base}{path}", content=body, headers={"Content-Type": "application/json"},
                             timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error


# ----- chat ------------------------------------------------------------------------------------------------------
def test_chat_template_is_role_lines_ending_with_the_assistants_turn():
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
                ChatMessage(role="assistant", content=[{"type": "text", "text": "Hello"}]),
                ChatMessage(role="user", content="Bye")]
    assert chat_prompt(messages) == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"


def test_chat_completions_with_the_openai_client_streamed_and_not(served):
    openai = pytest.importorskip("openai")
    model, tokenizer = served
    app = create_app(*served, Limits(max_tokens=24), model_id="tiny", allowed_hosts=["127.0.0.1", "localhost"])
    messages = [{"role": "system", "content": "You answer."}, {"role": "user", "content": "I like eating"}]
    with live_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        # The same text as a completion of the documented template, cut at the next role line.
        text = "System: You answer.\nUser: I like eating\nAssistant:"
        completion = httpx.post(f"{base}/v1/completions", json={
            "prompt": text, "max_tokens": 12, "temperature": 0, "stop": ["\nUser:", "\nSystem:", "\nAssistant:"]},
            timeout=30).json()["choices"][0]
        with pytest.raises(openai.NotFoundError) as wrong:
            client.chat.completions.create(model="gpt-4", messages=messages)
        completions = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                                logprobs=1, echo=True)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == completion["text"].lstrip()
    assert reply.choices[0].finish_reason == completion["finish_reason"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert "'tiny'" in str(wrong.value)
    assert completions.choices[0].logprobs.token_logprobs[0] is None
    assert completions.choices[0].text.startswith(PROMPT)


# ----- lm-eval's local-completions against a real `bwarea serve` ---------------------------------------------
TASKS = {
    "bw_choice": """task: bw_choice
dataset_path: json
dataset_kwargs:
  data_files: {path}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "bw_rolling": """task: bw_rolling
dataset_path: json
dataset_kwargs:
  data_files: {path}
test_split: train
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""",
    "bw_generate": """task: bw_generate
dataset_path: json
dataset_kwargs:
  data_files: {path}
test_split: train
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
DOCS = {
    "bw_choice": [{"question": "The king said unto them,", "choices": [" go", " apples", " the"], "answer": 0},
                  {"question": "I like eating", "choices": [" apples", " king", " ,"], "answer": 0}],
    "bw_rolling": [{"text": "The king said unto them, go and tell the people."},
                   {"text": "And it came to pass in those days that there went out a decree."}],
    "bw_generate": [{"question": "The king said", "answer": " unto"}, {"question": "Once upon a", "answer": " time"}],
}


def write_tasks(folder):
    for name, yaml in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in DOCS[name]))
        (folder / f"{name}.yaml").write_text(yaml.format(path=data))


@pytest.mark.slow
def test_lm_eval_local_completions_agrees_with_lm_log_likelihood(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from bwarea import default_model
    from bwarea.loading import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    write_tasks(tmp_path)
    model, tokenizer = load()
    context = model.config.max_position_embeddings
    app = create_app(model, tokenizer, model_id="bwarea-default", allowed_hosts=["127.0.0.1"])
    with live_server(app) as base:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={base}/v1/completions,model=bwarea-default,tokenizer={default_model.path()},"
                       f"tokenizer_backend=huggingface,max_length={context},tokenized_requests=True",
            tasks=list(TASKS), task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
            num_fewshot=0, bootstrap_iters=0)
    samples = results["samples"]
    bos = tokenizer.bos_token_id

    def exact(ids):
        return sum(mixture(model, ids))

    # loglikelihood: lm-eval scores the continuation's tokens after the context's (no BOS: add_bos_token=False).
    checked = 0
    for sample in samples["bw_choice"]:
        for (context_text, continuation), (ll, _) in zip((a for a in sample["arguments"]),
                                                         (r[0] for r in sample["resps"])):
            whole = tokenizer(context_text + continuation, add_special_tokens=False)["input_ids"]
            n_context = len(tokenizer(context_text, add_special_tokens=False)["input_ids"])
            expected = sum(mixture(model, whole)[n_context - 1:])
            assert ll == pytest.approx(expected, rel=1e-3)
            checked += 1
    assert checked == 6
    # loglikelihood_rolling: the whole text after BOS (short texts: one window).
    assert len(samples["bw_rolling"]) == len(samples["bw_generate"]) == 2
    for sample in samples["bw_rolling"]:
        text = sample["doc"]["text"]
        ll = sample["resps"][0][0]
        assert ll == pytest.approx(exact([bos] + tokenizer(text, add_special_tokens=False)["input_ids"]), rel=1e-3)
    words = sum(len(d["text"].split()) for d in DOCS["bw_rolling"])
    total = sum(s["resps"][0][0] for s in samples["bw_rolling"])
    assert results["results"]["bw_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words),
                                                                                    rel=1e-6)
    # generate_until: the server's greedy text, cut at the first newline.
    for sample in samples["bw_generate"]:
        ids = tokenizer(sample["doc"]["question"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, action_greedy=True)
        text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).split("\n")[0]
        assert sample["resps"][0][0] == text
    assert "acc,none" in results["results"]["bw_choice"]
