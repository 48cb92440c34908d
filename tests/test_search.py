"""Search over latent actions (bwarea.search and `bwarea search`): seeds, budgets, the greedy guarantee, MCTS.

Budgets are checked against an independent count of what the world model wrote: every ``model.fanout`` and
``model.generate`` call the search makes is recorded, and its rows counted here.
"""

import json
import textwrap

import pytest
import torch

from bwarea.search import METHODS, search
from conftest import WorldModelWrites, scrambled

PROMPT = "The king said"


@pytest.fixture
def tokenizer(released_tokenizer):
    return released_tokenizer


@pytest.fixture
def model(sharp_tiny_model):
    return sharp_tiny_model


def prompt_ids(tokenizer, text=PROMPT):
    return torch.tensor(tokenizer(text)["input_ids"])


def token_count(target: int):
    """A reward: how often token ``target`` occurs in the completion (read from ``completion_ids``)."""
    def reward(prompts, completions, completion_ids, **kwargs):
        return [float(ids.count(target)) for ids in completion_ids]
    return reward


def greedy_completion(model, ids, steps):
    out = model.generate(ids[None], max_new_tokens=steps, do_sample=False, action_greedy=True,
                         return_dict_in_generate=True)
    return out.sequences[0, ids.numel():][out.new_token_mask[0]].tolist()


# ----- determinism and budgets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_search(model, tokenizer, method):
    ids = prompt_ids(tokenizer)
    runs = [search(model, ids, tokenizer=tokenizer, reward=scrambled, method=method, budget=300, max_new_tokens=6,
                   seed=seed, temperature=0.7) for seed in (1, 1, 2)]
    a, b, c = (r.to_dict() for r in runs)
    for r in (a, b, c):
        r["stats"].pop("wall_time")
    assert a == b
    assert (a["top"], a["completion_ids"]) != (c["top"], c["completion_ids"])  # another seed searches elsewhere


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [8, 97, 300])
def test_budget_is_never_exceeded_and_counts_every_token_written(model, tokenizer, monkeypatch, method, budget):
    writes = WorldModelWrites(model, monkeypatch)
    steps = 8
    try:
        result = search(model, prompt_ids(tokenizer), tokenizer=tokenizer, reward=scrambled, method=method,
                        budget=budget, max_new_tokens=steps, seed=0)
    except ValueError as err:  # beam cannot run one beam of 4 branches on 8 tokens with 8 or 97 evaluations
        assert method == "beam" and budget < steps + 4 * steps and "raise the budget" in str(err)
        return
    stats = result.stats
    assert stats.evaluations == writes.count <= budget
    n = model.config.num_actions
    if method == "best_of_n":  # stops only when another sample of up to `steps` tokens might not fit
        assert budget - stats.evaluations < steps
    if method == "mcts" and budget >= steps + n + steps:
        assert stats.fanouts >= 1 and budget - stats.evaluations < n + steps


def test_value_guided_search_pays_only_fanouts_and_two_sequences(model, tokenizer, monkeypatch):
    writes = WorldModelWrites(model, monkeypatch)
    seen = []

    def value(prompts, completions, completion_ids, **kwargs):
        seen.extend(completion_ids)
        return [float(ids.count(7)) for ids in completion_ids]

    steps, n = 6, model.config.num_actions
    result = search(model, prompt_ids(tokenizer), tokenizer=tokenizer, reward=token_count(7), method="mcts",
                    budget=400, max_new_tokens=steps, seed=0, value=value)
    st = result.stats
    # No rollouts: the greedy sequence, the fan-outs and one completion of the most visited path.
    assert st.evaluations == writes.count <= 400
    assert st.fanouts * n <= st.evaluations <= st.fanouts * n + 2 * steps
    assert st.fanouts == (400 - 2 * steps) // n
    assert seen and all(0 < len(ids) < steps for ids in seen)  # partial completions


# ----- the learned action-value (value="q") and top-k expansion ---------------------------------------------------
@pytest.fixture
def q_model(model):
    """The tiny model with a random Q head (so that values differ between actions and states)."""
    model.policy.add_q_head()
    model.config.value_head = True
    with torch.no_grad():
        torch.manual_seed(3)
        model.policy.q_head.weight.normal_(0, 0.5)
    return model


VARIANTS = [("mcts", {"expansion": "topk"}), ("mcts", {"value": "q"}), ("mcts", {"value": "q", "expansion": "topk"}),
            ("beam", {"value": "q"})]


@pytest.mark.parametrize("method,options", VARIANTS)
def test_q_and_topk_searches_are_seeded_and_pay_exactly_what_they_write(q_model, tokenizer, monkeypatch, method,
                                                                           options):
    ids = prompt_ids(tokenizer)
    runs = [search(q_model, ids, tokenizer=tokenizer, reward=scrambled, method=method, budget=100, max_new_tokens=6,
                   seed=seed, temperature=0.7, **options) for seed in (1, 1, 2)]
    a, b, c = (r.to_dict() for r in runs)
    for r in (a, b, c):
        r["stats"].pop("wall_time")
    assert a == b and (a["top"], a["completion_ids"]) != (c["top"], c["completion_ids"])
    writes = WorldModelWrites(q_model, monkeypatch)
    for budget in (30, 100):  # 30: the greedy sequence and one beam of 4 branches over 6 tokens
        writes.count = 0
        result = search(q_model, ids, tokenizer=tokenizer, reward=scrambled, method=method, budget=budget,
                        max_new_tokens=6, seed=0, **options)
        assert result.stats.evaluations == writes.count <= budget
        assert result.reward >= result.greedy_reward


def test_mcts_with_q_pays_no_rollouts_and_follows_the_learned_values(q_model, tokenizer, monkeypatch):
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        prior = torch.softmax(q_model.policy_logits(ids[None])[0, -1], -1)
        writes_ = q_model.fanout(ids[None])[0].argmax(-1)
    # Q says: only the action writing the root's least likely kept token is worth anything.
    result = search(q_model, ids, tokenizer=tokenizer, reward=scrambled, method="mcts", budget=70, max_new_tokens=6,
                    seed=0, rounds=1)
    last = result.top[-1]
    with torch.no_grad():
        q_model.policy.q_head.weight.zero_()
        q_model.policy.q_head.bias.fill_(-1.0)
        q_model.policy.q_head.bias[[a for a in range(64) if int(writes_[a]) == int(writes_[last["action"]])]] = 1.0
    writes = WorldModelWrites(q_model, monkeypatch)
    steps, n = 6, q_model.config.num_actions
    result = search(q_model, ids, tokenizer=tokenizer, reward=scrambled, method="mcts", budget=400,
                    max_new_tokens=steps, seed=0, value="q")
    st = result.stats
    assert st.evaluations == writes.count and st.fanouts * n <= st.evaluations <= st.fanouts * n + 2 * steps
    assert result.top[0]["action"] == last["action"] and result.top[0]["visits"] > result.top[1]["visits"]
    assert float(prior[last["action"]]) < float(prior.max())  # the prior alone would not have picked it


def test_value_q_without_a_value_head_is_an_error(model, tokenizer):
    for method in ("mcts", "beam"):
        with pytest.raises(ValueError, match=f"{method}: value='q' needs a model with a value head"):
            search(model, prompt_ids(tokenizer), tokenizer=tokenizer, reward=scrambled, method=method, budget=200,
                   max_new_tokens=4, value="q")
    with pytest.raises(ValueError, match="expansion must be one of fanout, topk, got 'all'"):
        search(model, prompt_ids(tokenizer), tokenizer=tokenizer, reward=scrambled, budget=200, max_new_tokens=4,
               expansion="all")


def test_bad_arguments_are_named(model, tokenizer):
    ids = prompt_ids(tokenizer)
    common = dict(tokenizer=tokenizer, reward=scrambled, budget=50, max_new_tokens=4)
    cases = [
        (dict(method="dfs"), "unknown search method 'dfs'"),
        (dict(method="mcts", beams=3), "takes no option 'beams'"),
        (dict(method="best_of_n", budget=3), "budget 3 is below max_new_tokens 4"),
        (dict(method="best_of_n", n=20), "n=20 samples"),
        (dict(method="mcts", cpuct=float("nan")), "cpuct must be a finite number"),
        (dict(method="mcts", root_branches=65), "root_branches must be an int in 1..64"),
        (dict(method="mcts", reward=None), "search needs a reward"),
        (dict(method="mcts", reward="nope"), "not a built-in task"),
        (dict(method="beam", max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            search(model, ids, **{**common, **kwargs})


def test_a_padded_batch_searches_each_prompt_as_if_alone(model, tokenizer):
    tokenizer.padding_side = "left"
    texts = [PROMPT, "O"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    options = dict(tokenizer=tokenizer, reward=scrambled, method="mcts", budget=200, max_new_tokens=5, seed=3)
    batch = search(model, enc["input_ids"], enc["attention_mask"], **options)
    alone = [search(model, prompt_ids(tokenizer, t), **options) for t in texts]
    assert [r.sequence for r in batch] == [r.sequence for r in alone]
    assert [r.reward for r in batch] == [r.reward for r in alone]


# ----- what search finds -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_never_worse_than_the_greedy_sequence(model, tokenizer, method):
    ids = prompt_ids(tokenizer)
    steps = 6
    greedy = greedy_completion(model, ids, steps)

    def closeness_to_greedy(prompts, completions, completion_ids, **kwargs):
        # Greedy is the unique best here: anything a search explores scores lower.
        return [-float(sum(a != b for a, b in zip(c, greedy)) + abs(len(c) - len(greedy))) for c in completion_ids]

    for reward in (scrambled, closeness_to_greedy):
        result = search(model, ids, tokenizer=tokenizer, reward=reward, method=method, budget=400,
                        max_new_tokens=steps, seed=0, **({"branches": 2} if method == "beam" else {}))
        assert result.greedy_completion == tokenizer.decode(greedy, skip_special_tokens=True)
        assert result.greedy_reward == reward([], [], completion_ids=[greedy])[0]
        assert result.reward == reward([], [], completion_ids=[result.completion_ids])[0]
        assert result.reward >= result.greedy_reward
    assert result.completion_ids == greedy  # the greedy-optimal reward keeps the greedy sequence


def test_scrambled_reward_search_beats_greedy(model, tokenizer):
    """With a reward the policy knows nothing about, any search of a few hundred evaluations finds better."""
    for method in METHODS:
        result = search(model, prompt_ids(tokenizer), tokenizer=tokenizer, reward=scrambled, method=method,
                        budget=400, max_new_tokens=6, seed=0, **({"branches": 2} if method == "beam" else {}))
        assert result.reward > result.greedy_reward, method


def test_mcts_finds_the_token_one_action_writes(model, tokenizer):
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        written = model.fanout(ids[None])[0].argmax(-1)  # (num_actions,) the token each action writes next
        prior = model.policy_logits(ids[None])[0, -1]
    greedy_token = int(written[prior.argmax()])
    # The likeliest action, after the greedy one, whose token differs from the greedy token.
    action = next(a for a in prior.argsort(descending=True).tolist() if int(written[a]) != greedy_token)
    target = int(written[action])

    def first_token_is_target(prompts, completions, completion_ids, **kwargs):
        return [float(bool(c) and c[0] == target) for c in completion_ids]

    result = search(model, ids, tokenizer=tokenizer, reward=first_token_is_target, method="mcts", budget=300,
                    max_new_tokens=5, seed=0)
    assert result.greedy_reward == 0.0
    assert result.reward == 1.0 and result.completion_ids[0] == target
    assert int(written[result.actions[0]]) == target  # the action the search returns writes that token
    assert any(c["action"] == result.actions[0] and c["visits"] >= 1 for c in result.top)


# ----- the command ---------------------------------------------------------------------------------------------
def test_cli_searches_prints_the_tree_and_rejects_bad_flags(tiny_model_dir, tmp_path, capsys):
    from bwarea.cli import main

    def cli(*args):
        code = main(["search", *map(str, args)])
        return code, capsys.readouterr()

    (tmp_path / "r.py").write_text(textwrap.dedent("""
        def score(prompts, completions, completion_ids, **kwargs):
            return [float((sum(ids) * 7919) % 101) for ids in completion_ids]
    """))
    common = [PROMPT, "--model", tiny_model_dir, "--reward", f"{tmp_path / 'r.py'}:score", "--max-new-tokens", 4]
    code, out = cli(*common, "--budget", 200, "--json")
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["method"] == "mcts" and result["stats"]["evaluations"] <= 200
    assert result["reward"] >= result["greedy_reward"] and len(result["actions"]) == len(result["completion_ids"])
    assert "search mcts" in out.err  # the progress bar, on stderr
    code, out = cli(*common, "--budget", 200)
    assert code == 0 and "top of the tree" in out.out and "search  reward" in out.out
    code, out = cli(*common, "--budget", 100, "--method", "best_of_n", "--n", 3)
    assert code == 0 and "best samples" in out.out
    code, out = cli(*common, "--budget", 200, "--beams", 2)
    assert code == 2 and out.err.strip() == "bwarea search: error: --beams applies to --method beam, not mcts"
    code, out = cli(*common, "--budget", 200, "--value", "q")  # the tiny model has no value head
    assert code == 2 and "mcts: value='q' needs a model with a value head" in out.err
    code, out = cli(*common, "--budget", 200, "--method", "best_of_n", "--value", "q")
    assert code == 2 and "--value applies to --method mcts or beam, not best_of_n" in out.err
    code, out = cli(*common, "--budget", 200, "--expansion", "topk", "--json")
    assert code == 0 and json.loads(out.out)["stats"]["fanouts"] == 0
    code, out = cli(*common, "--budget", 3)
    assert code == 2 and "--budget 3 is below --max-new-tokens 4" in out.err
    code, out = cli(PROMPT, "--model", tiny_model_dir, "--task", "nope", "--budget", 50)
    assert code == 2 and "not a built-in task" in out.err and "Traceback" not in out.err
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "bwarea search" in help_text.split("examples:")[1]
