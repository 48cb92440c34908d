"""The algorithm registry: every algorithm is one file with its defaults, advantages and loss; RLOO as the
example of a new one (its advantages against a hand computation, and a training run)."""

import argparse
from types import SimpleNamespace

import pytest
import torch

from bwarea import load_tokenizer
from bwarea.rl import RLConfig, RLTrainer, Reward, RewardSet
from bwarea.rl import algorithms as alg
from bwarea.rl.trainer import PolicyWithValue

PROMPTS = ["The king said", "O", "and then the", "I am a"]


@pytest.fixture(scope="module")
def tokenizer(released_dir):
    return load_tokenizer(released_dir)


def test_registry_gives_the_cli_choices_and_each_algorithm_its_defaults():
    from bwarea.commands import rl as rl_command
    parser = argparse.ArgumentParser()
    rl_command.register(parser.add_subparsers())
    action = next(a for a in parser._subparsers._group_actions[0].choices["rl"]._actions if a.dest == "algo")
    assert tuple(action.choices) == alg.ALGORITHMS == ("reinforce", "grpo", "ppo", "rloo", "q")
    for name in alg.ALGORITHMS:
        algorithm = alg.get(name)
        assert algorithm.name == name
        config = RLConfig(algo=name, batch_size=4).resolved()
        assert {k: getattr(config, k) for k in algorithm.defaults} == algorithm.defaults
    assert alg.get("ppo").value_head and not alg.get("rloo").value_head
    with pytest.raises(ValueError, match="unknown algorithm 'dpo': choose one of reinforce, grpo, ppo, rloo"):
        alg.get("dpo")
    with pytest.raises(ValueError, match="rloo.*group_size must be >= 2"):
        RLConfig(algo="rloo", group_size=1).resolved()


def test_rloo_advantages_and_loss_match_a_hand_computation():
    # Two prompts, three samples each; one reward per sample at its last decision (decisions at columns 1..3).
    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, 1:4] = True
    mask[5, 3] = False  # a shorter completion: its last decision is at column 2
    rewards = torch.zeros(6, 5)
    last = torch.tensor([3, 3, 3, 3, 3, 2])
    rewards[torch.arange(6), last] = returns
    rollout = SimpleNamespace(rewards=rewards, action_mask=mask, group=torch.tensor([0, 0, 0, 1, 1, 1]),
                              step_mask=rewards != 0)
    rloo = alg.get("rloo")(RLConfig(algo="rloo").resolved())
    adv, targets = rloo.advantages(rollout, None, 1.0, lambda x: float(x))
    # R_i minus the mean of the other two returns of its group.
    hand = torch.tensor([1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 0 - 3, 3 - 1.5, 3 - 1.5])
    assert targets is None
    assert torch.allclose(adv, hand[:, None] * mask)  # the whole return on every decision, 0 elsewhere
    # A skipped sample (no decision left) is neither advantaged nor part of the others' baselines.
    kept = torch.tensor([True, True, False, True, True, True])
    skipped = SimpleNamespace(**{**vars(rollout), "action_mask": mask & kept[:, None]})
    adv2, _ = rloo.advantages(skipped, None, 1.0, lambda x: float(x))
    assert torch.allclose(adv2[:2, 1], torch.tensor([1.0 - 2.0, 2.0 - 1.0])) and (adv2[2] == 0).all()
    # Loss: -mean over samples of A_i * (sum of the sample's action log-probs).
    logp = -torch.rand(6, 5)
    loss, clip_frac = rloo.loss(logp, logp, adv, mask)
    expect = -(hand * (logp * mask).sum(-1)).mean()
    assert torch.isclose(loss, expect) and float(clip_frac) == 0.0


def test_value_head_reads_the_policys_own_forward(tiny_model):
    model = tiny_model
    head = torch.nn.Linear(model.config.hidden_size, 1)
    ids = torch.randint(0, 500, (2, 7))
    cos, sin, attn = model.positions_and_mask(None, 2, 7, ids.device, model.world_model.embed_tokens.weight.dtype)
    with torch.no_grad():
        logits, values = PolicyWithValue(model.policy, head)(ids, cos, sin, attn)
        plain, none = PolicyWithValue(model.policy)(ids, cos, sin, attn)
        p = model.policy
        hidden = p.norm(p.run(p.embed_tokens(ids), cos, sin, attn))
    assert none is None and torch.equal(logits, plain) and torch.equal(logits, model.policy(ids, cos, sin, attn))
    assert values.shape == (2, 7) and torch.allclose(values, head(hidden).squeeze(-1))


def test_rloo_trains_only_the_policy(tiny_model, tokenizer, tmp_path):
    def short(prompts, completions, completion_ids, **kwargs):
        return [-float(len(ids)) for ids in completion_ids]

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    config = RLConfig(algo="rloo", steps=2, batch_size=2, max_new_tokens=6, lr=3e-3, save_every=2, tensorboard=False)
    trainer = RLTrainer(tiny_model, tokenizer, config, tmp_path / "rloo", rewards=RewardSet([Reward("short", short)]),
                        prompts=[{"prompt": p} for p in PROMPTS])
    history = trainer.train()
    after = tiny_model.state_dict()
    assert [m["updates"] for m in history] == [1, 1] and all(m["samples"] == 8 for m in history)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("policy."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("policy."))
    assert (tmp_path / "rloo" / "model.safetensors").is_file()
