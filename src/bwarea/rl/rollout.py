"""Rollouts: sample completions (or whole multi-turn episodes) with the policy choosing actions.

Everything in a ``Rollout`` is laid out by *decision position*. The action that produced token t+1 was
chosen by the policy at position t, from tokens <= t, so it is stored in column t; the policy's logits
at column t (``model.policy_logits(sequences, attention_mask)[:, t]``) are the distribution it was drawn
from. For a single turn with padded prompt length P, new token i sits at P+i and its action at P+i-1.

(The released README's example read the logits at ``[prompt_length:]``, one position late, and masked
padding by comparing the *mask* with the pad id; here decisions are marked by the generation engine's
``new_token_mask``: True up to and including EOS, False for padding after it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .rewards import RewardError, check_reward_value, call_with_timeout


@dataclass
class Rollout:
    """A batch of sampled text and the decisions behind it.

    sequences (batch, seq) long: prompt + everything written, left padded.
    attention_mask (batch, seq) long: 1 for real tokens (prompt, written tokens, observations).
    actions (batch, seq) long: actions[:, t] produced token t+1 (0 where there was no decision).
    action_mask (batch, seq) bool: True where column t is a policy decision that counts.
    rewards (batch, seq) float64: rewards given at decisions (the last decision of each turn); float64 so
        any finite reward is held as given (the trainer scales them into float32's range).
    step_mask (batch, seq) bool: where a reward was given (a reward of 0 is still a reward).
    group (batch,) long: samples with the same group share a prompt (GRPO, leave-one-out).
    behaviour_logprobs (batch, seq) float: log pi(action) as the generation engine computed it.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    actions: torch.Tensor
    action_mask: torch.Tensor
    rewards: torch.Tensor
    step_mask: torch.Tensor
    group: torch.Tensor
    behaviour_logprobs: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def last_decision(self) -> torch.Tensor:
        """(batch,) column of each row's last decision (0 for a row without any)."""
        cols = torch.arange(self.action_mask.shape[1], device=self.action_mask.device)
        return (self.action_mask * cols).amax(-1)

    def set_sequence_rewards(self, rewards: torch.Tensor) -> None:
        """Give each row's reward (batch,) at its last decision: the single-turn case."""
        rows = torch.arange(len(self), device=self.rewards.device)
        last = self.last_decision()
        self.rewards.zero_()
        self.step_mask.zero_()
        self.rewards[rows, last] = rewards.to(self.rewards)
        self.step_mask[rows, last] = self.action_mask.any(-1)

    def drop(self, keep: torch.Tensor) -> None:
        """Leave rows where keep (batch,) is False out of every update (their decisions stop counting)."""
        keep = keep.to(self.action_mask.device)
        self.action_mask &= keep[:, None]
        self.step_mask &= keep[:, None]
        self.rewards *= keep[:, None]

    def to(self, device) -> "Rollout":
        for f in fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                setattr(self, f.name, value.to(device))
        return self


def _generate(model, tokenizer, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, generator):
    # Actions are sampled at temperature 1 from the policy itself, so the rollout is on-policy.
    return model.generate(
        input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
        top_k=top_k, top_p=top_p, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
        action_greedy=False, action_temperature=1.0, generator=generator)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], *, group_size: int = 1, max_new_tokens: int = 32,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                       max_prompt_tokens: int | None = None, generator: torch.Generator | None = None) -> Rollout:
    """One completion per (prompt, copy): ``len(prompts) * group_size`` rows, copies of a prompt adjacent.

    Rewards are left at 0: the caller scores ``completions`` and calls ``set_sequence_rewards``.
    """
    if not prompts:
        raise ValueError("no prompts to sample from")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # a long prompt keeps its end, where the completion continues
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=max_prompt_tokens is not None,
                    max_length=max_prompt_tokens)
    ids = enc["input_ids"].repeat_interleave(group_size, 0).to(device)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, 0).to(device)
    out = _generate(model, tokenizer, ids, prompt_mask, max_new_tokens, temperature, top_k, top_p, generator)
    batch, p = ids.shape[0], out.prompt_length
    new_mask = out.new_token_mask.bool()
    n = new_mask.shape[1]
    seq_len = out.sequences.shape[1]
    actions = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    action_mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    logprobs = torch.zeros(batch, seq_len, dtype=torch.float32, device=device)
    # New token i (column p+i) was produced by the action chosen at column p+i-1.
    actions[:, p - 1:p - 1 + n] = out.actions * new_mask
    action_mask[:, p - 1:p - 1 + n] = new_mask
    logprobs[:, p - 1:p - 1 + n] = out.action_logprobs.float() * new_mask
    attention_mask = torch.cat([prompt_mask.long(), new_mask.long()], dim=1)
    completion_ids = [row[m].tolist() for row, m in zip(out.sequences[:, p:], new_mask)]
    return Rollout(
        sequences=out.sequences, attention_mask=attention_mask, actions=actions, action_mask=action_mask,
        rewards=torch.zeros(batch, seq_len, dtype=torch.float64, device=device),
        step_mask=torch.zeros_like(action_mask),
        group=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        behaviour_logprobs=logprobs, prompts=[p_ for p_ in prompts for _ in range(group_size)],
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True), completion_ids=completion_ids)


@torch.no_grad()
def play_episodes(model, tokenizer, envs: list, *, group: list[int] | None = None, max_turns: int = 8,
                  max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                  generator: torch.Generator | None = None, timeout: float | None = None) -> Rollout:
    """Play one episode in each environment; all live episodes write their turn in one batch.

    A turn: the model continues the transcript, the environment reads what it wrote and answers with
    (observation, reward, done); the observation is appended and the reward is given at the turn's last
    decision. Observation tokens are context, not decisions. ``group`` gives GRPO groups (copies of one
    environment seed); default one group per environment. An environment with a ``stop`` string (TextWorld: a
    newline) has its turn cut after the first written token holding it.
    """
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    tokenizer.padding_side = "left"
    n = len(envs)
    openings = [_env_reset(env, i, timeout) for i, env in enumerate(envs)]
    tokens = [tokenizer(text).input_ids for text in openings]
    token_actions = [[-1] * len(t) for t in tokens]  # -1: not written by a decision
    token_logprobs = [[0.0] * len(t) for t in tokens]
    step_rewards: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    written = [""] * n
    done = [False] * n
    for turn in range(max_turns):
        live = [i for i in range(n) if not done[i]]
        if not live:
            break
        width = max(len(tokens[i]) for i in live)
        ids = torch.full((len(live), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(live), width, dtype=torch.long)
        for row, i in enumerate(live):
            ids[row, width - len(tokens[i]):] = torch.tensor(tokens[i])
            mask[row, width - len(tokens[i]):] = 1
        out = _generate(model, tokenizer, ids.to(device), mask.to(device), max_new_tokens, temperature, top_k, top_p,
                        generator)
        p = out.prompt_length
        for row, i in enumerate(live):
            m = out.new_token_mask[row].bool()
            new, acts = out.sequences[row, p:][m].tolist(), out.actions[row][m].tolist()
            logps = out.action_logprobs[row][m].float().tolist()
            # An environment with a stop string ends the turn at the first token holding it. Stopping there is a
            # stopping rule on the sampled tokens, so the kept decisions and their log-probs stay on-policy.
            keep = _stop_cut(new, getattr(envs[i], "stop", None), tokenizer)
            new, acts, logps = new[:keep], acts[:keep], logps[:keep]
            text = tokenizer.decode(new, skip_special_tokens=True)
            observation, reward, finished = _env_step(envs[i], i, text, timeout)
            tokens[i] += new
            token_actions[i] += acts
            token_logprobs[i] += logps
            step_rewards[i].append((len(tokens[i]) - 1, reward))
            written[i] += text
            obs_ids = tokenizer(observation, add_special_tokens=False).input_ids if observation else []
            done[i] = finished or turn == max_turns - 1 or len(tokens[i]) + len(obs_ids) + max_new_tokens > limit
            if not done[i]:
                tokens[i] += obs_ids
                token_actions[i] += [-1] * len(obs_ids)
                token_logprobs[i] += [0.0] * len(obs_ids)
    return _assemble(tokens, token_actions, token_logprobs, step_rewards, openings, written, group,
                     tokenizer.pad_token_id, device)


def _stop_cut(new: list[int], stop: str | None, tokenizer) -> int:
    """How many of the turn's tokens ``new`` to keep: up to and including the first whose text holds ``stop``."""
    if not stop:
        return len(new)
    for k, token in enumerate(new):
        if stop in tokenizer.decode([token]):
            return k + 1
    return len(new)


def _assemble(tokens, token_actions, token_logprobs, step_rewards, openings, written, group, pad_id, device) -> Rollout:
    """Per-episode token lists -> a left-padded Rollout, decisions at the column before their token."""
    n, width = len(tokens), max(len(t) for t in tokens)
    r = Rollout(
        sequences=torch.full((n, width), pad_id, dtype=torch.long),
        attention_mask=torch.zeros(n, width, dtype=torch.long),
        actions=torch.zeros(n, width, dtype=torch.long), action_mask=torch.zeros(n, width, dtype=torch.bool),
        rewards=torch.zeros(n, width, dtype=torch.float64), step_mask=torch.zeros(n, width, dtype=torch.bool),
        group=torch.tensor(group if group is not None else list(range(n)), dtype=torch.long),
        behaviour_logprobs=torch.zeros(n, width), prompts=openings, completions=written,
        completion_ids=[[t for t, a in zip(ts, acts) if a >= 0] for ts, acts in zip(tokens, token_actions)])
    for i in range(n):
        offset = width - len(tokens[i])
        r.sequences[i, offset:] = torch.tensor(tokens[i])
        r.attention_mask[i, offset:] = 1
        acts = torch.tensor(token_actions[i])
        cols = (acts >= 0).nonzero().squeeze(-1) + offset - 1
        r.actions[i, cols] = acts[acts >= 0]
        r.action_mask[i, cols] = True
        r.behaviour_logprobs[i, cols] = torch.tensor(token_logprobs[i])[acts >= 0]
        for index, reward in step_rewards[i]:
            r.rewards[i, offset + index - 1] += reward
            r.step_mask[i, offset + index - 1] = True
    return r.to(device)


def _env_reset(env, i: int, timeout: float | None = None) -> str:
    prompt = call_with_timeout(env.reset, timeout, f"environment {type(env).__name__} (episode {i}) reset()")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"environment {type(env).__name__} (episode {i}): reset() must return a non-empty "
                         f"prompt string, got {prompt!r}")
    return prompt


def _env_step(env, i: int, text: str, timeout: float | None = None) -> tuple[str, float, bool]:
    result = call_with_timeout(lambda: env.step(text), timeout,
                               f"environment {type(env).__name__} (episode {i}) step()")
    if not (isinstance(result, tuple) and len(result) == 3):
        raise ValueError(f"environment {type(env).__name__} (episode {i}): step() must return "
                         f"(observation, reward, done), got {result!r}")
    observation, reward, finished = result
    reward, problem = check_reward_value(reward)
    if problem:
        raise RewardError(f"environment {type(env).__name__} (episode {i}) gave reward {problem} for "
                          f"{text[:60]!r}; rewards must be finite numbers")
    if not isinstance(observation, str):
        raise ValueError(f"environment {type(env).__name__} (episode {i}): observation must be a string, "
                         f"got {type(observation).__name__}")
    return observation, reward, bool(finished)
