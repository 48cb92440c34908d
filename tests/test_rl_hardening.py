"""RL under bad rewards and bad settings: checked values, guarded updates, strict metrics, timeouts."""

import copy
import json
import math
import sys
import threading
import time
import textwrap

import numpy as np
import pytest
import torch

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea.rl import (Reward, RewardError, RewardSet, RewardTimeout, RLConfig, RLStopped, RLTrainer, load_reward,
                       play_episodes)
from bwarea.rl import algorithms as alg
from bwarea.rl.rewards import call_with_timeout

PROMPTS = ["The king said", "O", "and then the", "I am a"]


@pytest.fixture
def tokenizer(released_dir):
    return load_tokenizer(released_dir)


def strict_lines(path):
    """Every line of a metrics file, parsed as strict JSON (NaN / Infinity refused)."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _set(fn, skip=False, timeout=None):
    return RewardSet([Reward("r", fn)], skip_bad=skip, timeout=timeout)


def _trainer(model, tokenizer, out, rewards, algo="grpo", steps=2, **overrides):
    settings = dict(algo=algo, steps=steps, batch_size=2, group_size=2, max_new_tokens=4, lr=3e-3, save_every=steps,
                    tensorboard=False)
    if algo == "ppo":
        settings.update(group_size=1, batch_size=4)
    config = RLConfig(**{**settings, **overrides})
    return RLTrainer(model, tokenizer, config, out, rewards=rewards, prompts=[{"prompt": p} for p in PROMPTS])


def _policy(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("policy.")}


# ----- settings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("kl_coef", math.nan), ("kl_coef", math.inf), ("kl_coef", -0.1),
                                          ("lr", math.nan), ("lr", math.inf), ("lr", 5.0), ("clip", math.nan),
                                          ("entropy_coef", math.nan), ("max_grad_norm", math.inf), ("gamma", 1.5),
                                          ("lam", math.nan), ("temperature", math.nan), ("top_p", 0.0),
                                          ("vf_coef", -1.0), ("reward_timeout", math.nan), ("seed", 2**70),
                                          ("top_k", 0), ("max_bad_steps", 0), ("ema_decay", 1.0)])
def test_config_refuses_non_finite_and_nonsensical_settings(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*got {value!r}"):
        RLConfig(**{field: value}).resolved()


def test_cli_refuses_bad_settings_at_parse_time_naming_the_flag(capsys):
    from bwarea.cli import main

    for flag, value in [("--kl-coef", "nan"), ("--kl-coef", "-1"), ("--lr", "inf"), ("--clip", "2"),
                        ("--entropy-coef", "nan"), ("--reward-timeout", "-5"), ("--reward-weight", "inf"),
                        ("--steps", "0"), ("--top-p", "nan")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["rl", "--task", "keyword", "--out", "never-written", flag, value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument {flag}:" in err and "Traceback" not in err, err
        assert value in err


# ----- reward values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("returned, shown", [
    (["1.0"] * 3, r"returned '1\.0' \(a str, not a number\) for sample 0"),
    (["abc"] * 3, r"returned 'abc' \(a str, not a number\) for sample 0"),
    ([1.0, None, 2.0], r"returned None for sample 1"),
    ([1.0, 2.0, 10**400], r"returned an int too large for a float \(about 10\*\*400\) for sample 2"),
    ([1.0, -math.inf, 0.0], r"returned -inf for sample 1"),
    ([1.0, 2.0, 1 + 2j], r"returned \(1\+2j\) \(a complex, not a number\) for sample 2"),
])
def test_bad_reward_values_name_what_was_returned(returned, shown):
    def reward(prompts, completions, **kw):
        return returned

    with pytest.raises(RewardError, match=shown):
        _set(reward).score(["p"] * 3, ["a", "b", "c"])
    s = _set(reward, skip=True)
    total, valid, _ = s.score(["p"] * 3, ["a", "b", "c"])
    bad = [not (isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e300 and math.isfinite(v))
           for v in returned]
    assert valid.tolist() == [not b for b in bad] and s.skipped == sum(bad)
    assert torch.isfinite(total).all()


def test_numbers_of_every_kind_are_accepted():
    def reward(prompts, completions, **kw):
        return [True, np.float32(0.5), torch.tensor(2.0), 3]

    total, valid, _ = _set(reward).score(["p"] * 4, list("abcd"))
    assert total.tolist() == [1.0, 0.5, 2.0, 3.0] and valid.all()
    total, valid, _ = _set(lambda prompts, completions, **kw: np.array([1.5, 2.5])).score(["p"] * 2, ["a", "b"])
    assert total.tolist() == [1.5, 2.5]


def test_a_weighted_sum_that_overflows_is_a_bad_sample():
    big = RewardSet([Reward("a", lambda prompts, completions, **kw: [1e308, 1.0]),
                     Reward("b", lambda prompts, completions, **kw: [1e308, 2.0])])
    with pytest.raises(RewardError, match="weighted sum of the rewards overflows for sample 0"):
        big.score(["p"] * 2, ["x", "y"])
    big.skip_bad = True
    total, valid, means = big.score(["p"] * 2, ["x", "y"])
    assert valid.tolist() == [False, True] and total.tolist() == [0.0, 3.0]
    assert means == {"a": pytest.approx(0.5e308 + 0.5), "b": pytest.approx(0.5e308 + 1.0)}  # no overflow in the mean


def test_reward_files_that_fail_to_load_give_one_clear_line(tmp_path):
    (tmp_path / "syntax.py").write_text("def f(prompts, completions:\n    return []\n")
    (tmp_path / "imports.py").write_text("import numpy\nimport no_such_module_for_bwarea\n")
    (tmp_path / "raises.py").write_text("X = 1\nY = 1 / 0\n")
    before = set(sys.modules)
    with pytest.raises(ValueError, match=r"cannot load '.*syntax\.py': SyntaxError: .*\(syntax\.py, line 1\)"):
        load_reward(f"{tmp_path / 'syntax.py'}:f")
    with pytest.raises(ValueError, match=r"imports\.py': ModuleNotFoundError: No module named "
                                         r"'no_such_module_for_bwarea' \(imports\.py, line 2\)"):
        load_reward(f"{tmp_path / 'imports.py'}:f")
    with pytest.raises(ValueError, match=r"raises\.py': ZeroDivisionError: division by zero \(raises\.py, line 2\)"):
        load_reward(f"{tmp_path / 'raises.py'}:f")
    assert not [m for m in set(sys.modules) - before if m.startswith("bwarea_reward_")]


def test_cli_prints_a_broken_reward_file_as_one_line(tmp_path, capsys, monkeypatch):
    from bwarea.cli import main

    monkeypatch.delenv("BWAREA_DEBUG", raising=False)
    (tmp_path / "broken.py").write_text("def f(:\n")
    code = main(["rl", "--reward", f"{tmp_path / 'broken.py'}:f", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "broken.py" in err and "SyntaxError" in err
    assert not (tmp_path / "out").exists()


# ----- timeouts ----------------------------------------------------------------------------------------------
def test_a_reward_that_never_returns_times_out():
    release = threading.Event()

    def hangs(prompts, completions, **kw):
        release.wait(60)  # the test lets it go once done, so the abandoned thread ends
        return [1.0] * len(completions)

    try:
        for skip in (False, True):  # a hung call cannot be skipped: it may still be running
            start = time.perf_counter()
            with pytest.raises(RewardTimeout, match=r"reward 'r' \(called on 2 samples\) did not return within 0\.3 s"):
                _set(hangs, skip=skip, timeout=0.3).score(["p"] * 2, ["a", "b"])
            assert time.perf_counter() - start < 10
    finally:
        release.set()
    # Errors raised inside the worker thread reach the caller; no limit calls in this thread.
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, 5.0, "x")
    assert call_with_timeout(threading.current_thread, 0, "x") is threading.current_thread()


def test_an_environment_that_hangs_or_gives_a_string_reward_stops_the_episode(tiny_model, tokenizer):
    release = threading.Event()

    class Env:
        def __init__(self, reward):
            self.reward = reward

        def reset(self):
            return "Words with T:"

        def step(self, text):
            if self.reward == "hang":
                release.wait(60)
            return "", self.reward, True

    try:
        with pytest.raises(RewardTimeout, match=r"environment Env \(episode 0\) step\(\) did not return within 0\.3 s"):
            play_episodes(tiny_model, tokenizer, [Env("hang")], max_turns=1, max_new_tokens=2, timeout=0.3)
    finally:
        release.set()
    with pytest.raises(RewardError, match=r"gave reward '1\.0' \(a str, not a number\)"):
        play_episodes(tiny_model, tokenizer, [Env("1.0")], max_turns=1, max_new_tokens=2)


# ----- huge but finite rewards -------------------------------------------------------------------------------
def _signed_reward(magnitude):
    """+magnitude or -magnitude by the parity of the first token written: varied, never all equal by design."""
    def reward(prompts, completions, completion_ids, **kw):
        return [magnitude if ids and ids[0] % 2 else -magnitude for ids in completion_ids]
    return RewardSet([Reward("signed", reward)])


def test_reward_scale_is_an_exact_power_of_two():
    assert alg.reward_scale(0.0) == alg.reward_scale(2.0**32) == 1.0
    assert alg.reward_scale(2.0**1000) == 2.0**968
    s = alg.reward_scale(1e308)
    assert 2.0**31 < 1e308 / s <= 2.0**32 and math.log2(s).is_integer()


@pytest.mark.parametrize("algo", ["grpo", "ppo", "reinforce"])
def test_huge_rewards_train_every_algorithm_as_their_scaled_values(tiny_model, tokenizer, tmp_path, algo):
    start = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    # 2**1000 is scaled by exactly 2**968 to 2**32, so the run must match a run given 2**32 bit for bit.
    huge = _trainer(tiny_model, tokenizer, tmp_path / "huge", _signed_reward(2.0**1000), algo=algo)
    history = huge.train()
    plain = _trainer(copy.deepcopy(start), tokenizer, tmp_path / "plain", _signed_reward(2.0**32), algo=algo)
    plain.train()
    for k, v in _policy(plain.model).items():
        assert torch.equal(huge.model.state_dict()[k], v), k
    assert all(m["updates"] > 0 and m["nonfinite_updates"] == 0 for m in history)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("policy."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("policy."))
    logged = strict_lines(tmp_path / "huge" / "metrics.jsonl")
    assert [m["reward_scale"] for m in logged] == [2.0**968] * 2 and "reward_scale" not in strict_lines(
        tmp_path / "plain" / "metrics.jsonl")[0]
    assert all(abs(m["reward"]) <= 2.0**1000 for m in logged)  # reported in the reward's own units


@pytest.mark.parametrize("algo", ["grpo", "ppo", "reinforce"])
def test_rewards_near_the_float_limit_keep_the_policy_finite(tiny_model, tokenizer, tmp_path, algo):
    trainer = _trainer(tiny_model, tokenizer, tmp_path / algo, _signed_reward(1e308), algo=algo)
    history = trainer.train()
    assert all(torch.isfinite(p).all() for p in tiny_model.policy.parameters())
    assert all(m["updates"] > 0 and m["nonfinite_updates"] == 0 and math.isfinite(m["loss"]) for m in history)
    logged = strict_lines(tmp_path / algo / "metrics.jsonl")
    assert len(logged) == 2 and all(math.isfinite(m["reward_std"]) for m in logged)
    loaded = BWAreaForCausalLM.from_pretrained(tmp_path / algo)
    assert all(torch.isfinite(v).all() for v in loaded.state_dict().values())


# ----- the update guard --------------------------------------------------------------------------------------
def _poison_loss(monkeypatch, when):
    """Make the policy loss NaN while when(step) is True (step: the step being run, from 1)."""
    real = alg.clipped_loss

    def clipped_loss(logp, *args, **kwargs):
        loss, frac = real(logp, *args, **kwargs)
        return (loss * math.nan if when() else loss), frac

    from bwarea.rl.algorithms import base  # where GRPO and PPO's loss looks it up
    monkeypatch.setattr(base, "clipped_loss", clipped_loss)


def test_a_non_finite_loss_skips_the_update_and_keeps_the_policy(tiny_model, tokenizer, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model, tokenizer, tmp_path / "run", _signed_reward(1.0), steps=3)
    _poison_loss(monkeypatch, lambda: trainer.step_count == 1)  # the second step
    trainer.step()
    policy, optimizer = _policy(tiny_model), copy.deepcopy(trainer.optimizer.state_dict())
    second = trainer.step()
    assert second["updates"] == 0 and second["nonfinite_updates"] == 1 and math.isnan(second["loss"])
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in policy.items())
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], optimizer["state"][i]["exp_avg"]) for i in state)
    assert trainer.step()["updates"] == 1 and trainer.bad_streak == 0


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_non_finite_gradient_is_caught_with_and_without_clipping(tiny_model, tokenizer, tmp_path, max_grad_norm):
    trainer = _trainer(tiny_model, tokenizer, tmp_path / "run", _signed_reward(1.0), max_grad_norm=max_grad_norm)
    policy = _policy(tiny_model)
    backward = trainer.acc.backward

    def nan_gradient(loss):
        backward(loss)
        next(p for p in trainer.module.parameters() if p.grad is not None).grad.view(-1)[0] = math.inf

    trainer.acc.backward = nan_gradient
    metrics = trainer.step()
    assert metrics["nonfinite_updates"] == 1 and metrics["updates"] == 0
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in policy.items())


def test_persistent_non_finite_updates_stop_the_run_and_write_no_model(tiny_model, tokenizer, tmp_path, monkeypatch):
    start = _policy(tiny_model)
    trainer = _trainer(tiny_model, tokenizer, tmp_path / "run", _signed_reward(1.0), steps=6, max_bad_steps=2)
    _poison_loss(monkeypatch, lambda: True)
    with pytest.raises(RLStopped, match=r"not finite in 2 steps in a row \(up to step 2; last: loss nan.*"
                                        r"--max-bad-steps 2\)\. No model was written"):
        trainer.train()
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in start.items())
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "checkpoints").exists()
    logged = strict_lines(tmp_path / "run" / "metrics.jsonl")
    assert [(m["step"], m["loss"], m["updates"], m["nonfinite_updates"]) for m in logged] == [(1, None, 0, 1),
                                                                                             (2, None, 0, 1)]


def test_a_run_that_goes_bad_keeps_its_last_good_model(tiny_model, tokenizer, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model, tokenizer, tmp_path / "run", _signed_reward(1.0), steps=8, save_every=2,
                       max_bad_steps=2)
    _poison_loss(monkeypatch, lambda: trainer.step_count >= 2)  # steps 3 and 4 go bad
    with pytest.raises(RLStopped, match=r"up to step 4.* keeps the model of step 2\."):
        trainer.train()
    saved = BWAreaForCausalLM.from_pretrained(tmp_path / "run")
    for k, v in _policy(tiny_model).items():
        assert torch.equal(saved.state_dict()[k], v), k  # skipped steps changed nothing after step 2


# ----- steps without a usable sample -------------------------------------------------------------------------
def test_all_bad_rewards_skip_the_step_and_a_run_without_updates_fails(tiny_model_dir, tmp_path, capsys):
    from bwarea.cli import main

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "r.py").write_text(textwrap.dedent("""
        def nan_reward(prompts, completions, **kw):
            return [float("nan")] * len(completions)
    """))
    code = main(["rl", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                 "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4", "--no-tensorboard",
                 "--reward", f"{tmp_path / 'r.py'}:nan_reward", "--skip-bad-rewards", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 1 and "model written" not in out.out
    assert "bwarea rl: stopped: no update was made in steps 1..2: 2 had no usable sample (8 samples with bad" in out.err
    assert "no model was written" in out.err and "Traceback" not in out.err
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "config.json").exists()
    logged = strict_lines(tmp_path / "out" / "metrics.jsonl")
    assert [(m["reward"], m["loss"], m["updates"], m["skipped"]) for m in logged] == [(None, None, 0, 4)] * 2


def test_a_step_without_usable_samples_makes_no_update(tiny_model, tokenizer, tmp_path):
    calls = []

    def sometimes_bad(prompts, completions, **kw):
        calls.append(1)
        return [math.nan if len(calls) == 2 else 1.0 for _ in completions]  # the second step is all bad

    trainer = _trainer(tiny_model, tokenizer, tmp_path / "run", RewardSet([Reward("r", sometimes_bad)], skip_bad=True),
                       steps=3)
    trainer.step()
    policy = _policy(tiny_model)
    empty = trainer.step()
    assert empty["updates"] == 0 and empty["skipped"] == 4 and math.isnan(empty["reward"])
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in policy.items())
    assert trainer.step()["updates"] == 1
