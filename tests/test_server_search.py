"""The `search` object of POST /v1/completions: search over actions on the server, through httpx and the openai
client, under the server's limits (budget, max_tokens, time), with every refusal a 400 naming the field.

Budgets are checked against an independent count of what the world model wrote (every ``fanout`` and
``generate`` row the search makes), as tests/test_search.py does for the library function.
"""

import time

import httpx
import pytest
import torch
from conftest import WorldModelWrites, scrambled, tiny_config
from fastapi.testclient import TestClient
from test_server import PROMPT, live_server

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea.cli import main
from bwarea.serve import Limits, create_app
from bwarea.serve.app import load_search_rewards, parse_search_reward

MAX_TOKENS = 5


def make_app(served, **limits):
    limits = {"max_tokens": 16, "max_search_budget": 400, **limits}
    return create_app(*served, Limits(**limits), model_id="tiny",
                      search_rewards={"scrambled": scrambled, "love": "keyword"})


@pytest.fixture(scope="module")
def served(released_dir):
    """(model, tokenizer): conftest's tiny model and tokenizer, built once for this module (searches leave the
    model as they found it)."""
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # as conftest's tiny_model: actions visibly change the next token
        model.action_codebook.embed.weight.normal_(0, 1.0)
        model.world_model.action_proj.weight.normal_(0, 0.5)
    return model, load_tokenizer(released_dir)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(make_app(served)) as c:
        yield c


def search_request(**search):
    return {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "seed": 0, "return_actions": True,
            "search": {"reward": "scrambled", "budget": 300, **search}}


def post(client, body):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def without_time(result: dict) -> dict:
    """A response without what differs between two identical requests (id, time stamps, seconds taken)."""
    search = {**result["search"], "stats": {k: v for k, v in result["search"]["stats"].items() if k != "seconds"}}
    return {"choices": result["choices"], "usage": result["usage"], "search": search}


# ----- a search, as a completion -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mcts", "beam", "best_of_n"])
def test_search_returns_a_completion_with_its_actions_reward_and_stats(client, served, monkeypatch, method):
    _, tokenizer = served
    writes = WorldModelWrites(served[0], monkeypatch)
    result = post(client, search_request(method=method))
    choice, search = result["choices"][0], result["search"]
    assert result["object"] == "text_completion" and result["model"] == "tiny"
    assert search["method"] == method and search["reward_name"] == "scrambled"
    # The choice is the searched sequence, and the reward is the server reward's value of it.
    assert choice["actions"] == search["actions"]
    assert 1 <= len(choice["token_ids"]) == len(search["actions"]) <= MAX_TOKENS
    assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
    assert choice["text"] == "".join(choice["tokens"])
    assert search["reward"] == scrambled([], [], [choice["token_ids"]])[0]
    assert len(choice["action_logprobs"]) == len(choice["actions"]) and all(lp <= 0 for lp in choice["action_logprobs"])
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    assert result["usage"]["completion_tokens"] == len(choice["token_ids"])
    # Never worse than the policy's greedy sequence; the budget is what the world model wrote, never more.
    assert search["reward"] >= search["greedy"]["reward"]
    stats = search["stats"]
    assert stats["evaluations"] == writes.count <= stats["budget"] == 300
    assert stats["nodes"] >= 1 and stats["sequences"] >= 1 and stats["seconds"] > 0
    assert search["top"]


def test_the_greedy_sequence_is_the_policys_greedy_completion(client):
    """The explorer shows search.greedy beside a temperature-0 completion: they must be the same sequence."""
    search = post(client, search_request(method="beam"))["search"]
    greedy = post(client, {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "return_actions": True})
    assert greedy["choices"][0]["text"] == search["greedy"]["text"]
    assert greedy["choices"][0]["actions"] == search["greedy"]["actions"]


def test_topk_expansion_spends_one_evaluation_per_written_child(client, served, monkeypatch):
    writes = WorldModelWrites(served[0], monkeypatch)
    search = post(client, search_request(method="mcts", expansion="topk", budget=120))["search"]
    assert search["stats"]["evaluations"] == writes.count <= 120 and search["stats"]["fanouts"] == 0
    assert search["reward"] >= search["greedy"]["reward"]


def test_same_seed_same_search(client):
    first = post(client, search_request(method="mcts", budget=250))
    assert without_time(post(client, search_request(method="mcts", budget=250))) == without_time(first)
    assert post(client, search_request(method="best_of_n", n=3))["search"]["stats"]["sequences"] == 4  # greedy + 3


def test_budget_below_the_server_limit_is_spent_exactly_as_counted(served, monkeypatch):
    writes = WorldModelWrites(served[0], monkeypatch)
    with TestClient(make_app(served, max_search_budget=97)) as c:
        stats = post(c, search_request(budget=97))["search"]["stats"]
        assert c.post("/v1/completions", json=search_request(budget=98)).status_code == 400
    assert stats["evaluations"] == writes.count <= 97


def test_openai_client_and_httpx_against_a_live_server(served):
    openai = pytest.importorskip("openai")
    with live_server(make_app(served)) as base:
        body = search_request(method="mcts", budget=200)
        by_httpx = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert by_httpx.status_code == 200, by_httpx.text
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, seed=0,
                                               extra_body={"search": body["search"], "return_actions": True})
        assert completion.choices[0].text == by_httpx.json()["choices"][0]["text"]
        search = completion.model_extra["search"]
        assert search["actions"] == by_httpx.json()["search"]["actions"]
        assert search["stats"]["evaluations"] <= 200
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                      extra_body={"search": {"reward": "scrambled", "budget": 10**6}})
        assert "--max-search-budget" in refused.value.body["message"]


def test_a_spec_reward_is_loaded_at_start_and_the_only_reward_is_the_default(served):
    app = create_app(*served, Limits(max_tokens=16), model_id="tiny", search_rewards={"love": "keyword"})
    with TestClient(app) as c:
        result = post(c, {"prompt": PROMPT, "max_tokens": 4, "seed": 0,
                          "search": {"method": "best_of_n", "budget": 40}})
        assert result["search"]["reward_name"] == "love" and "token_ids" not in result["choices"][0]
        assert c.get("/v1/models").json()["data"][0]["search"]["rewards"] == ["love"]


# ----- refusals: a 400 naming the field or the limit -----------------------------------------------------------
REFUSED = [
    ({"search": {"reward": "scrambled", "budget": 401}}, "search.budget", "above this server's limit 400"),
    ({"search": {"reward": "scrambled", "budget": 3}}, "search.budget", "below max_tokens 5"),
    ({"max_tokens": 17}, "max_tokens", "above this server's limit 16"),
    ({"max_tokens": 0}, "max_tokens", "needs max_tokens >= 1"),
    ({"search": {"budget": 100}}, "search.reward", "search.reward is required"),
    ({"search": {"reward": "nope", "budget": 100}}, "search.reward", "'nope' is not a reward of this server"),
    ({"search": {"reward": "scrambled", "budget": 100, "method": "dfs"}}, "search", "search.method"),
    ({"search": {"reward": "scrambled", "budget": 100, "depth": 3}}, "search", "search.depth: Extra inputs"),
    ({"search": {"reward": "scrambled", "budget": 100, "method": "beam", "cpuct": 1.0}}, "search.cpuct",
     "an option of method 'mcts', not of 'beam'"),
    ({"search": {"reward": "scrambled", "budget": 100, "method": "best_of_n", "n": 50}}, "search",
     "raise the budget or lower n"),
    ({"search": {"reward": "scrambled", "budget": 100, "root_branches": 65}}, "search", "root_branches"),
    ({"search": {"reward": "scrambled"}}, "search", "search.budget: Field required"),
    ({"search": {"reward": "scrambled", "budget": 100, "value": "q"}}, "search", "value head"),
    ({"search": {"reward": "scrambled", "budget": 100, "method": "beam", "expansion": "topk"}}, "search.expansion",
     "an option of method 'mcts', not of 'beam'"),
    ({"stream": True}, "stream", "cannot be used with search"),
    ({"n": 2}, "n", "cannot be used with search"),
    ({"best_of": 2}, "best_of", "cannot be used with search"),
    ({"echo": True}, "echo", "cannot be used with search"),
    ({"logprobs": 1}, "logprobs", "cannot be used with search"),
    ({"stop": "\n"}, "stop", "cannot be used with search"),
    ({"top_p": 0.5}, "top_p", "cannot be used with search"),
    ({"actions": 3}, "actions", "the search chooses the actions"),
    ({"prompt": [PROMPT, PROMPT]}, "prompt", "a search takes one prompt"),
]


@pytest.mark.parametrize("fields, param, message", REFUSED)
def test_refusals_name_the_field(client, fields, param, message):
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "search": {"reward": "scrambled", "budget": 100}, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_a_server_without_rewards_refuses_search(served):
    with TestClient(create_app(*served, Limits(max_tokens=16), model_id="tiny")) as c:
        response = c.post("/v1/completions", json={"prompt": PROMPT, "search": {"budget": 100}})
        assert response.status_code == 400 and "--search-reward" in response.json()["error"]["message"]


@pytest.mark.parametrize("method", ["mcts", "best_of_n"])
def test_the_time_limit_stops_a_search_and_the_server_goes_on(served, method):
    """MCTS pays a step between reward calls; best-of-N scores up to 32 samples between steps: both stop soon."""
    def slow(prompts, completions, **kwargs):
        time.sleep(0.05)
        return [0.0] * len(completions)

    app = create_app(*served, Limits(max_tokens=16, search_timeout=0.2), model_id="tiny",
                     search_rewards={"slow": slow})
    with TestClient(app) as c:
        started = time.monotonic()
        response = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "search": {
            "method": method, "budget": 400}})
        assert time.monotonic() - started < 1.5  # the whole search would take several seconds
        assert response.status_code == 400
        assert "time limit of 0.2 s" in response.json()["error"]["message"] and "--search-timeout" in response.text
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_a_failing_server_reward_is_a_500_naming_it(served):
    def broken(prompts, completions, **kwargs):
        return ["nan?"] * len(completions)

    with TestClient(create_app(*served, Limits(max_tokens=16), model_id="tiny",
                               search_rewards={"broken": broken})) as c:
        response = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "search": {"budget": 20}})
        assert response.status_code == 500 and "search reward 'broken' failed" in response.json()["error"]["message"]


def test_a_disconnected_client_stops_its_search(served):
    """A client that leaves mid-search frees the worker at the search's next step, not after the whole search."""
    calls = []

    def slow(prompts, completions, **kwargs):  # MCTS scores one rollout per round: 0.1 s a round
        calls.append(time.monotonic())
        time.sleep(0.1)
        return [0.0] * len(completions)

    app = create_app(*served, Limits(max_tokens=16, max_search_budget=2000, search_timeout=60), model_id="tiny",
                     search_rewards={"slow": slow})
    with live_server(app) as base:
        body = {"prompt": PROMPT, "max_tokens": 8, "search": {"method": "mcts", "budget": 2000}}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
            httpx.post(f"{base}/v1/completions", json=body, timeout=0.5)
        # This request waits for the worker, so it returns only once the search has stopped.
        started = time.monotonic()
        assert httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                          timeout=30).status_code == 200
        assert time.monotonic() - started < 2
    assert len(calls) < 12  # the whole search would score well over 20 rollouts


# ----- bwarea serve --search-reward ----------------------------------------------------------------------------
def test_search_reward_flags():
    assert parse_search_reward("love=keyword") == ("love", "keyword")
    assert parse_search_reward("sentiment") == ("sentiment", "sentiment")
    assert parse_search_reward("mine=rewards.py:brevity") == ("mine", "rewards.py:brevity")
    for bad in ("my reward=keyword", "=keyword", "x="):
        with pytest.raises(ValueError, match="--search-reward"):
            parse_search_reward(bad)
    rewards = load_search_rewards({"love": "keyword"}, {"keywords": "joy"})
    assert rewards["love"]([""], ["such joy"]) == [1.0]
    with pytest.raises(ValueError, match="not a built-in task"):
        load_search_rewards({"x": "nope"})


@pytest.mark.parametrize("flags, needle", [(["--search-reward", "x=nope"], "not a built-in task"),
                                           (["--search-reward", "a b=keyword"], "NAME=SPEC"),
                                           (["--search-reward", "k=keyword", "--search-reward", "k=length"],
                                            "given twice"),
                                           (["--max-search-budget", "0"], "--max-search-budget must be >= 1"),
                                           (["--search-timeout", "nan"], "--search-timeout must be")])
def test_serve_refuses_bad_search_flags_before_loading_the_model(flags, needle, capsys, monkeypatch):
    monkeypatch.setattr("bwarea.commands.serving.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["serve", *flags]) == 2
    assert needle in capsys.readouterr().err
