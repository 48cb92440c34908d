"""Policy optimisation: the maths, rewards, rollout alignment, a gradient check, frozen parts, a learning run."""

import json
import math
import textwrap

import pytest
import torch

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea.rl import (Reward, RewardError, RewardModel, RewardSet, RLConfig, RLTrainer, build_reward_set,
                       load_prompts, load_reward, play_episodes, sample_completions)
from bwarea.rl import algorithms as alg
from bwarea.rl import tasks
from bwarea.rl.envs import Environment, LetterGame, make_env


# ----- the maths ------------------------------------------------------------------------------------------
def test_exact_kl_and_entropy_match_their_definitions():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    assert torch.allclose(alg.exact_kl(p_logits, q_logits), (p * (p / q).log()).sum(-1), atol=1e-5)
    assert torch.allclose(alg.exact_kl(p_logits, p_logits), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(alg.entropy(torch.zeros(1, 1, 64)), torch.tensor([[math.log(64)]]))


def test_leave_one_out_baseline_and_grpo_outcome_advantages():
    returns = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0, 7.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.allclose(alg.leave_one_out_baseline(returns, group), torch.tensor([0.0, 0.5, 0.5, 6.0, 5.0, 4.0]))
    valid = torch.tensor([True, True, False, True, True, True])  # sample 2 skipped
    assert torch.allclose(alg.leave_one_out_baseline(returns, group, valid),
                          torch.tensor([0.0, 1.0, 0.5, 6.0, 5.0, 4.0]))
    # One reward per row at its last decision: GRPO gives every decision (R - mean) / std of the group.
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, 1:4] = True
    rewards, step = torch.zeros(6, 5), torch.zeros(6, 5, dtype=torch.bool)
    rewards[:, 3], step[:, 3] = returns, True
    adv = alg.grpo_advantages(rewards, step, mask, group)
    expect = torch.cat([(returns[:3] - returns[:3].mean()) / returns[:3].std(),
                        (returns[3:] - returns[3:].mean()) / returns[3:].std()])
    assert torch.allclose(adv[:, 1], expect, atol=1e-3) and torch.allclose(adv[:, 3], expect, atol=1e-3)
    assert (adv[:, [0, 4]] == 0).all()
    same = alg.grpo_advantages(torch.ones(6, 5) * step, step, mask, group)
    assert (same == 0).all()  # no spread in a group: nothing to learn from it


def test_reward_to_go_and_gae_skip_non_decisions():
    # Decisions at columns 0, 1 and 3 (column 2 is an observation); rewards after turn 1 (col 1) and turn 2 (col 3).
    mask = torch.tensor([[True, True, False, True, False]])
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]])
    assert torch.equal(alg.reward_to_go(rewards, mask), torch.tensor([[3.0, 3.0, 0.0, 2.0, 0.0]]))
    values = torch.tensor([[0.5, 0.25, 9.0, 1.0, 9.0]])
    adv, ret = alg.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = 1: advantage = return-to-go - value; the value 9 at non-decisions never enters.
    assert torch.allclose(adv, torch.tensor([[2.5, 2.75, 0.0, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[3.0, 3.0, 0.0, 2.0, 0.0]]))
    adv0, _ = alg.gae(rewards, values, mask, gamma=1.0, lam=0.0)
    # lam = 0: one-step TD errors r + V(next decision) - V.
    assert torch.allclose(adv0, torch.tensor([[0.25 - 0.5, 1.0 + 1.0 - 0.25, 0.0, 2.0 - 1.0, 0.0]]))


def test_clipped_loss_and_clip_fraction():
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, frac = alg.clipped_loss(logp, old, adv, mask, clip=0.2)
    # ratios 1, 1.5, 0.5, 1.1 -> terms 1, 1.2 (clipped), -0.8 (clipped), -1.1
    assert torch.isclose(loss, -torch.tensor((1 + 1.2 - 0.8 - 1.1) / 4))
    assert float(frac) == 0.5


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown algorithm"):
        RLConfig(algo="dpo").resolved()
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        RLConfig(algo="grpo", group_size=1).resolved()
    with pytest.raises(ValueError, match="lr must be > 0"):
        RLConfig(lr=0).resolved()
    assert RLConfig(algo="ppo").resolved().epochs == 4


# ----- rewards ------------------------------------------------------------------------------------------
def test_tasks_score_text():
    kw = tasks.make_task("keyword", keywords="love,joy")
    assert kw(["p"] * 3, ["I Love thee", "lovely day", "joy!"]) == [1.0, 0.0, 1.0]
    ln = tasks.make_task("length", target_words=4)
    assert ln(["p"] * 3, ["a b c d", "a b", ""]) == [1.0, 0.5, 0.0]
    st = tasks.make_task("sentiment")
    good, bad, none = st(["p"] * 3, ["sweet love and joy", "death and woe", "..."])
    assert good > 0 > bad and none == 0.0


def test_load_reward_from_file_and_module(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def brevity(prompts, completions, **kw):\n    return [-len(c) for c in completions]\nNOT = 3\n")
    fn = load_reward(f"{f}:brevity")
    assert fn(["a"], ["xyz"]) == [-3]
    assert load_reward("bwarea.rl.tasks:keyword")(["p"], ["love"]) == [1.0]
    with pytest.raises(FileNotFoundError, match="no file"):
        load_reward(f"{tmp_path / 'missing.py'}:brevity")
    with pytest.raises(ValueError, match="not a callable"):
        load_reward(f"{f}:NOT")
    with pytest.raises(ValueError, match="has no attribute"):
        load_reward(f"{f}:nothing")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="not a built-in task"):
        load_reward("keywrd")


def _set(fn, skip=False):
    return RewardSet([Reward("r", fn)], skip_bad=skip)


def test_bad_rewards_name_the_reward_and_sample():
    completions = ["ok", "boom", "fine"]

    def raises(prompts, completions, **kw):
        return [1.0 if c != "boom" else 1 / 0 for c in completions]

    with pytest.raises(RewardError, match=r"reward 'r' raised ZeroDivisionError.*sample 1.*'boom'"):
        _set(raises).score(["p"] * 3, completions)
    with pytest.raises(RewardError, match=r"reward 'r' returned nan for sample 2"):
        _set(lambda prompts, completions, **kw: [1.0, 0.0, float("nan")]).score(["p"] * 3, completions)
    with pytest.raises(RewardError, match="returned inf for sample 0"):
        _set(lambda prompts, completions, **kw: [float("inf"), 0, 0]).score(["p"] * 3, completions)
    with pytest.raises(RewardError, match="returned 2 values for 3 samples"):
        _set(lambda prompts, completions, **kw: [1.0, 2.0]).score(["p"] * 3, completions)
    with pytest.raises(RewardError, match="not a list of numbers"):
        _set(lambda prompts, completions, **kw: 1.0).score(["p"] * 3, completions)
    # Skipping: the bad samples are marked invalid and counted, the good ones keep their values.
    s = _set(raises, skip=True)
    total, valid, _ = s.score(["p"] * 3, completions)
    assert valid.tolist() == [True, False, True] and total.tolist() == [1.0, 0.0, 1.0] and s.skipped == 1
    s = _set(lambda prompts, completions, **kw: [1.0, None, float("nan")], skip=True)
    assert s.score(["p"] * 3, completions)[1].tolist() == [True, False, False] and s.skipped == 2


def test_weighted_rewards_and_kwargs():
    seen = {}

    def ids_reward(prompts, completions, completion_ids, topic, **kw):
        seen["topic"] = topic
        return [len(i) for i in completion_ids]

    s = RewardSet([Reward("a", ids_reward, 2.0), Reward("b", tasks.make_task("keyword", keywords="x"), -1.0)])
    total, valid, means = s.score(["p", "q"], ["x", "y"], completion_ids=[[1, 2], [3]], topic=["t1", "t2"])
    assert total.tolist() == [2 * 2 - 1, 2 * 1 - 0] and means == {"a": 1.5, "b": 0.5}
    assert seen["topic"] == ["t1", "t2"]
    with pytest.raises(ValueError, match="2 --reward-weight values for 1 rewards"):
        build_reward_set(["keyword"], [1.0, 2.0])
    with pytest.raises(ValueError, match="no reward given"):
        build_reward_set([])


def test_reward_model_scores_with_a_local_classifier(tmp_path, released_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_labels=2, pad_token_id=0, id2label={0: "NEG", 1: "POS"},
                         label2id={"NEG": 0, "POS": 1})
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(str(released_dir)).save_pretrained(tmp_path / "rm")
    rm = RewardModel(tmp_path / "rm")
    scores = rm(["a", "bb"], [" the king", " of"])
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    neg = RewardModel(tmp_path / "rm", label="NEG")(["a", "bb"], [" the king", " of"])
    assert [round(a + b, 5) for a, b in zip(scores, neg)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="no label 'MAYBE'"):
        RewardModel(tmp_path / "rm", label="MAYBE")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RewardModel(tmp_path / "nothing")


def test_load_prompts_lines_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("The king\n\nO Romeo\n")
    assert load_prompts(tmp_path / "p.txt") == [{"prompt": "The king"}, {"prompt": "O Romeo"}]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "topic": "t"}\n{"prompt": "b", "topic": "u"}\n')
    assert load_prompts(tmp_path / "p.jsonl")[1] == {"prompt": "b", "topic": "u"}
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each JSONL line needs"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "none.txt")


def test_letter_game_rewards_the_named_letter():
    env = LetterGame(seed=3, turns=2)
    assert isinstance(env, Environment)
    prompt = env.reset()
    letter = prompt.split()[-1].rstrip(":").lower()
    obs, reward, done = env.step(f"{letter}ig {letter}ot dog")
    assert reward == pytest.approx(2 / 3) and not done and obs.startswith("\nWords with ")
    assert env.step("")[1:] == (0.0, True)
    with pytest.raises(ValueError, match="unknown environment"):
        make_env("chess")


# ----- rollouts on a tiny model -------------------------------------------------------------------------------
@pytest.fixture
def tokenizer(released_dir):
    return load_tokenizer(released_dir)


@pytest.fixture
def sharp_model(tiny_model):
    """The tiny model with a sharper world model: some actions make one token likely (about 50%)."""
    with torch.no_grad():
        tiny_model.world_model.lm_head.weight.mul_(3)
    return tiny_model


PROMPTS = ["The king said", "O", "and then the", "I am a"]


def test_rollout_aligns_actions_with_the_tokens_they_produced(tiny_model, tokenizer):
    # First pass: find a token sampled mid-row, then make it EOS and sample again from the same seed, so
    # rows stop early (the sampling is identical up to the first EOS).
    first = sample_completions(tiny_model, tokenizer, PROMPTS, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(0))
    tiny_model.config.eos_token_id = first.completion_ids[0][2]
    r = sample_completions(tiny_model, tokenizer, PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    p = r.sequences.shape[1] - 6
    assert any(len(ids) < 6 for ids in r.completion_ids), "the EOS trick should stop a row early"
    for row, ids in enumerate(r.completion_ids):
        n = len(ids)
        # Decisions sit one column before their token; nothing after EOS, nothing in the (padded) prompt.
        assert r.action_mask[row].nonzero().squeeze(-1).tolist() == list(range(p - 1, p - 1 + n))
        assert r.sequences[row, p:p + n].tolist() == ids
        assert (r.attention_mask[row, p + n:] == 0).all() and r.attention_mask[row, p - 1] == 1
        prompt = r.sequences[row, :p][r.attention_mask[row, :p].bool()]
        for i in range(n):
            # The policy on the unpadded prefix alone: the log-prob of the action that produced token i.
            prefix = torch.cat([prompt, torch.tensor(ids[:i], dtype=torch.long)])[None]
            logp = torch.log_softmax(tiny_model.policy_logits(prefix)[0, -1], -1)[r.actions[row, p - 1 + i]]
            assert torch.isclose(logp, r.behaviour_logprobs[row, p - 1 + i], atol=1e-4)
    # The padded batch forward agrees at every decision...
    logits = tiny_model.policy_logits(r.sequences, r.attention_mask)
    lp = alg.action_log_probs(logits, r.actions)
    assert torch.allclose(lp[r.action_mask], r.behaviour_logprobs[r.action_mask], atol=1e-4)
    # ...and the released README's reading (logits one position later) does not.
    late = alg.action_log_probs(logits[:, 1:], r.actions[:, :-1])
    assert not torch.allclose(late[r.action_mask[:, :-1]], r.behaviour_logprobs[r.action_mask], atol=1e-2)


def test_episodes_mark_turns_and_skip_observations(tiny_model, tokenizer):
    envs = [make_env("letters", seed=s, turns=3) for s in (0, 1)]
    r = play_episodes(tiny_model, tokenizer, envs, max_turns=3, max_new_tokens=4,
                      generator=torch.Generator().manual_seed(0))
    for row in range(2):
        assert int(r.step_mask[row].sum()) == 3          # one reward per turn
        assert not (r.step_mask[row] & ~r.action_mask[row]).any()
        text = tokenizer.decode(r.sequences[row][r.attention_mask[row].bool()], skip_special_tokens=True)
        assert text.count("Words with") == 3             # the opening and two observations
        # Observation tokens are context, not decisions: decisions' tokens are exactly what the model wrote.
        written = r.sequences[row, 1:][r.action_mask[row, :-1]].tolist()
        assert written == r.completion_ids[row]
    lp = alg.action_log_probs(tiny_model.policy_logits(r.sequences, r.attention_mask), r.actions)
    assert torch.allclose(lp[r.action_mask], r.behaviour_logprobs[r.action_mask], atol=1e-4)


def test_reinforce_gradient_matches_the_exact_policy_gradient(sharp_model, tokenizer):
    """grad E[R] computed exactly (sum over actions and next tokens) vs our estimator from 4096 rollouts."""
    model = sharp_model.requires_grad_(False)
    model.policy.requires_grad_(True)
    params = list(model.policy.parameters())
    enc = tokenizer(["The king said"], return_tensors="pt")
    with torch.no_grad():
        world = model.fanout(enc.input_ids).softmax(-1)[0]          # (A, V): p(next token | action)
    reward_table = torch.zeros(world.shape[1])
    reward_table[world.max(0).values.topk(8).indices] = 1.0          # tokens some action makes likely
    pi = model.policy_logits(enc.input_ids)[0, -1].softmax(-1)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad((pi * (world @ reward_table)).sum(), params)])

    n = 4096
    r = sample_completions(model, tokenizer, ["The king said"], group_size=n, max_new_tokens=1,
                           generator=torch.Generator().manual_seed(1))
    r.set_sequence_rewards(reward_table[torch.tensor([ids[0] for ids in r.completion_ids])])
    baseline = alg.leave_one_out_baseline(alg.sequence_returns(r.rewards), r.group)
    advantages = alg.reinforce_advantages(r.rewards, r.action_mask, baseline)
    logits = model.policy_logits(r.sequences, r.attention_mask)

    def estimate(lp):
        loss = alg.reinforce_loss(lp, advantages, r.action_mask)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(-loss, params, retain_graph=True)])

    ours = estimate(alg.action_log_probs(logits, r.actions))
    cosine = torch.nn.functional.cosine_similarity(ours, exact, dim=0)
    assert cosine > 0.9 and (ours - exact).norm() / exact.norm() < 0.5, (cosine, (ours - exact).norm() / exact.norm())
    # The off-by-one reading (logits at the new token's own position) estimates something else.
    shifted = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
    assert torch.nn.functional.cosine_similarity(estimate(alg.action_log_probs(shifted, r.actions)), exact, dim=0) < 0.7


# ----- training ----------------------------------------------------------------------------------------------
def _target_token(model, tokenizer) -> int:
    """The token that the most favourable action makes likeliest after the test prompts."""
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return int(model.fanout(enc.input_ids, enc.attention_mask).softmax(-1).mean(0).max(0).values.argmax())


def _token_reward(target):
    def share_of_target(prompts, completions, completion_ids, **kwargs):
        return [sum(t == target for t in ids) / max(1, len(ids)) for ids in completion_ids]
    return RewardSet([Reward("target", share_of_target)])


def _trainer(model, tokenizer, out, algo="grpo", steps=2, rewards=None, **overrides):
    settings = dict(algo=algo, steps=steps, batch_size=4, max_new_tokens=6, lr=3e-3, save_every=2, tensorboard=False)
    config = RLConfig(**{**settings, **overrides})
    rewards = rewards or RewardSet([Reward("kw", tasks.make_task("keyword", keywords="the"))])
    return RLTrainer(model, tokenizer, config, out, rewards=rewards, prompts=[{"prompt": p} for p in PROMPTS])


@pytest.mark.parametrize("algo", ["reinforce", "grpo", "ppo"])
def test_training_changes_only_the_policy(tiny_model, tokenizer, tmp_path, algo):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = _trainer(tiny_model, tokenizer, tmp_path / algo, algo=algo, rewards=_token_reward(300))
    history = trainer.train()
    after = tiny_model.state_dict()
    frozen = [k for k in before if not k.startswith("policy.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("policy."))
    assert all(not p.requires_grad for n, p in tiny_model.named_parameters() if not n.startswith("policy."))
    for key in ("step", "reward", "reward_std", "kl", "entropy", "clip_frac", "completion_length", "actions_used",
                "action_counts", "step_time", "skipped"):
        assert key in history[-1]
    assert history[-1]["samples"] == 16 if algo != "ppo" else history[-1]["samples"] == 4
    with torch.no_grad():
        tiny_model.world_model.norm.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="frozen weights changed during RL: world_model.norm.weight"):
        trainer.check_frozen()


def test_reward_rises_on_an_easy_task(sharp_model, tokenizer, tmp_path):
    target = _target_token(sharp_model, tokenizer)
    trainer = _trainer(sharp_model, tokenizer, tmp_path / "rise", steps=30, rewards=_token_reward(target), seed=0,
                       save_every=30)
    rewards = [m["reward"] for m in trainer.train()]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-8:]) / 8
    assert end > start + 0.05 and end > 2 * start, rewards


def test_output_folder_is_a_complete_model_and_resume_continues_the_run(tiny_model, tokenizer, tmp_path):
    import copy

    start = copy.deepcopy(tiny_model)
    full = _trainer(copy.deepcopy(start), tokenizer, tmp_path / "full", steps=4, rewards=_token_reward(300))
    whole = full.train()
    part = _trainer(copy.deepcopy(start), tokenizer, tmp_path / "part", steps=2, rewards=_token_reward(300))
    part.train()
    with pytest.raises(ValueError, match="already holds a run"):
        _trainer(copy.deepcopy(start), tokenizer, tmp_path / "part", steps=4).train()
    resumed = _trainer(copy.deepcopy(start), tokenizer, tmp_path / "part", steps=4, rewards=_token_reward(300))
    tail = resumed.train(resume=True)
    assert [m["step"] for m in tail] == [3, 4]
    assert [m["reward"] for m in tail] == [m["reward"] for m in whole[2:]]
    assert [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4]
    loaded = BWAreaForCausalLM.from_pretrained(tmp_path / "part")
    for k, v in loaded.state_dict().items():
        reference = (resumed.model if k.startswith("policy.") else start).state_dict()[k]
        assert torch.equal(v, reference), k
    assert torch.equal(loaded.state_dict()["policy.head.weight"], full.model.state_dict()["policy.head.weight"])
    assert len(load_tokenizer(tmp_path / "part")) == len(tokenizer)
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # Resuming from another starting model is refused: the KL reference would be wrong.
    other = copy.deepcopy(start)
    with torch.no_grad():
        other.policy.head.weight.add_(0.1)
    with pytest.raises(ValueError, match="not the one the run started from"):
        _trainer(other, tokenizer, tmp_path / "part", steps=6).train(resume=True)


def test_environment_training_runs(tiny_model, tokenizer, tmp_path):
    config = RLConfig(algo="ppo", steps=2, batch_size=2, max_new_tokens=4, max_turns=2, tensorboard=True, save_every=2)
    trainer = RLTrainer(tiny_model, tokenizer, config, tmp_path / "env",
                        env_factory=lambda seed: make_env("letters", seed=seed, turns=2))
    history = trainer.train()
    assert len(history) == 2 and history[-1]["completion_length"] > 4  # two turns of up to 4 tokens
    assert any(p.name.startswith("events") for p in (tmp_path / "env" / "tensorboard").iterdir())


# ----- the command ---------------------------------------------------------------------------------------------
def test_cli_trains_and_reports_bad_rewards(tiny_model_dir, tmp_path, capsys):
    from bwarea.cli import main

    def cli(*args):
        code = main(["rl", *map(str, args)])
        return code, capsys.readouterr()

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "r.py").write_text(textwrap.dedent("""
        VALUE = 3
        def nan_reward(prompts, completions, **kw):
            return [float("nan")] * len(completions)
        def first_nan(prompts, completions, **kw):
            return [float("nan") if i == 0 else 1.0 for i in range(len(completions))]
    """))
    common = ["--model", tiny_model_dir, "--prompts", tmp_path / "prompts.txt", "--steps", 2, "--batch-size", 2,
              "--group-size", 2, "--max-new-tokens", 4, "--no-tensorboard"]
    # One bad sample per step is skipped; a run whose every sample is bad fails (tests/test_rl_hardening.py).
    code, out = cli(*common, "--task", "keyword", "--keyword", "the", "--reward", f"{tmp_path / 'r.py'}:first_nan",
                    "--skip-bad-rewards", "--out", tmp_path / "ok")
    assert code == 0, out.err
    assert "skipped 2 samples with bad rewards" in out.out
    assert BWAreaForCausalLM.from_pretrained(tmp_path / "ok").config.num_actions == 64
    code, out = cli(*common, "--reward", f"{tmp_path / 'r.py'}:nan_reward", "--out", tmp_path / "nan")
    assert code == 2 and "reward" in out.err and "returned nan for sample 0" in out.err
    code, out = cli(*common, "--reward", f"{tmp_path / 'nope.py'}:f", "--out", tmp_path / "x")
    assert code == 2 and "no file" in out.err
    code, out = cli(*common, "--reward", f"{tmp_path / 'r.py'}:VALUE", "--out", tmp_path / "x")
    assert code == 2 and "not a callable" in out.err
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    assert "bwarea rl --task keyword" in capsys.readouterr().out
