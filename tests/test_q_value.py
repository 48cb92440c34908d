"""The learned action-value head (config.value_head, model.action_values) and its training (`--algo q`, QTrainer)."""

import json

import pytest
import torch
from conftest import tiny_config

from bwarea import BWAreaConfig, BWAreaForCausalLM
from bwarea.rl import Reward, RewardSet, RLConfig, RLTrainer
from bwarea.rl import algorithms as alg
from bwarea.rl.algorithms.q import QTrainer

PROMPT = "The king said"


@pytest.fixture
def tokenizer(released_tokenizer):
    return released_tokenizer


@pytest.fixture
def model(sharp_tiny_model):
    return sharp_tiny_model


def test_value_head_is_saved_and_loads_back_and_models_without_one_load_as_before(tmp_path, released_dir):
    torch.manual_seed(0)
    with_head = BWAreaForCausalLM(tiny_config(value_head=True)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    values = with_head.action_values(ids)
    assert values.shape == (1, 4, 64) and values.dtype == torch.float32
    with_head.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["value_head"] is True
    loaded = BWAreaForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.config.value_head and torch.equal(loaded.action_values(ids), values)
    assert {"policy.q_head.weight", "policy.q_head.bias"} <= set(loaded.state_dict())

    plain = BWAreaForCausalLM(tiny_config()).eval()
    assert plain.policy.q_head is None and not any("q_head" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="no value head.*--algo q"):
        plain.action_values(ids)
    released = BWAreaForCausalLM.from_pretrained(released_dir)  # the released format: no head, loads as before
    assert released.policy.q_head is None and released.config.value_head is False
    with pytest.raises(ValueError, match="value_head must be true or false"):
        BWAreaConfig(value_head="yes")


def _reward_first_token(target):
    def first_is_target(prompts, completions, completion_ids, **kwargs):
        return [float(bool(ids) and ids[0] == target) for ids in completion_ids]
    return RewardSet([Reward("first", first_is_target)])


def test_q_learns_the_value_of_the_rewarded_action_and_nothing_else_changes(model, tokenizer, tmp_path):
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        writes = model.fanout(ids)[0].argmax(-1)  # the token each action writes after the prompt
        prior = torch.softmax(model.policy_logits(ids)[0, -1], -1)
    target = int(writes[prior.argmax()])
    rewarded = writes == target  # the actions that write it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = RLConfig(algo="q", steps=8, batch_size=4, group_size=4, max_new_tokens=3, lr=1e-2, temperature=0.05,
                      save_every=8, tensorboard=False)
    history = QTrainer(model, tokenizer, config, tmp_path / "q", rewards=_reward_first_token(target),
                       prompts=[{"prompt": PROMPT}]).train()
    assert [m["updates"] for m in history] == [4] * 8 and all(m["kl"] == 0.0 for m in history)
    assert all({"value_loss", "q_taken", "td_target"} <= set(m) for m in history)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # policy, world model, ... all frozen
    with torch.no_grad():
        q = model.action_values(ids)[0, -1]
    # Started at 0 everywhere; the rewarded actions' Q rose towards 1 (prior-weighted over those sampled).
    q_rewarded = float((q * prior)[rewarded].sum() / prior[rewarded].sum())
    q_other = float((q * prior)[~rewarded].sum() / prior[~rewarded].sum())
    assert q_rewarded > 0.5 and q_rewarded > q_other + 0.4
    loaded = BWAreaForCausalLM.from_pretrained(tmp_path / "q")  # the run's model carries the trained head
    assert loaded.config.value_head and torch.allclose(loaded.action_values(ids), model.action_values(ids))


def test_td_targets_one_step_and_monte_carlo():
    # One row, decisions at columns 1..3, reward 1 at the last; Q' = 0.5 for every action everywhere.
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    target_q = torch.full((1, 5, 64), 0.5)
    logits = torch.randn(1, 5, 64)
    one_step = alg.td_targets(rewards, target_q, logits, mask, gamma=1.0, lam=0.0)
    assert torch.allclose(one_step, torch.tensor([[0.0, 0.5, 0.5, 1.0, 0.0]]))  # r + V'(next); last: r
    monte_carlo = alg.td_targets(rewards, target_q, logits, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(monte_carlo, torch.tensor([[0.0, 0.81, 0.9, 1.0, 0.0]]))


def test_rl_trainer_refuses_algo_q_and_the_cli_trains_a_head(model, tokenizer, tiny_model_dir, tmp_path, capsys):
    config = RLConfig(algo="q", steps=1, batch_size=2, max_new_tokens=3, tensorboard=False)
    with pytest.raises(ValueError, match="QTrainer"):
        RLTrainer(model, tokenizer, config, tmp_path / "no", rewards=_reward_first_token(5),
                  prompts=[{"prompt": PROMPT}])
    from bwarea.cli import main

    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\nO\n")
    code = main(["rl", "--algo", "q", "--model", str(tiny_model_dir), "--task", "length", "--steps", "2",
                 "--batch-size", "2", "--max-new-tokens", "3", "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "cli"), "--no-tensorboard"])
    assert code == 0, capsys.readouterr().err
    trained = BWAreaForCausalLM.from_pretrained(tmp_path / "cli")
    assert trained.config.value_head and trained.policy.q_head is not None


def test_a_resumed_q_run_ends_where_an_uninterrupted_one_does(tokenizer, tmp_path):
    def longer(prompts, completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def run(steps, resume=False):
        torch.manual_seed(0)
        model = BWAreaForCausalLM(tiny_config()).eval()
        config = RLConfig(algo="q", steps=steps, batch_size=2, max_new_tokens=3, lr=1e-2, save_every=1,
                          tensorboard=False)
        QTrainer(model, tokenizer, config, tmp_path / ("resumed" if steps < 4 or resume else "straight"),
                 rewards=RewardSet([Reward("longer", longer)]), prompts=[{"prompt": PROMPT}]).train(resume=resume)
        return model.policy.q_head.weight

    straight = run(4)
    run(2)
    assert torch.equal(run(4, resume=True), straight)  # the online head, its target and Adam's state came back
