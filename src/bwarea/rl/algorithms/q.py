"""Q: a learned action-value Q(s, a) over the actions, trained by TD with a target network (``bwarea rl --algo q``).

The Q head is a Linear from the policy's final hidden state (the output of its last norm, what the action head
reads) to ``num_actions`` values, saved with the model (``policy.q_head.*``, ``config.value_head: true``). It
estimates Q^pi: the expected reward of taking action a in state s (the tokens so far) and then following the
policy. MCTS uses it in place of rollouts (``bwarea.search``, ``value="q"``).

Only the Q head trains: the policy (trunk and action head), the world model, the inverse dynamics and the
codebook are frozen and checked bit-identical at every checkpoint. Rollouts come from the frozen policy, as
for the other algorithms (rewards or an environment; ``RLTrainer.collect``).

Targets are TD(lambda) returns bootstrapped on a **target network**: a copy of the Q head that trails it by
Polyak averaging (``TARGET_TAU`` per update). The value of a state under the target network is the policy's
expectation V'(s) = sum_a pi(a | s) Q'(s, a) (expected SARSA: the policy is fixed, so this is its value), and
the target of Q(s_t, a_t) is the lambda-return r_t + gamma * ((1 - lambda) V'(s_t+1) + lambda G_t+1) over the
decisions of each row (``--gamma``, ``--lam``). ``--lam 0`` is one-step TD with a target network (CoLA's
choice); ``--lam 1`` is the Monte-Carlo return; the default 0.95 carries a reward given at the end of a
24-token completion back to its first decisions within a few steps. The loss is 0.5 * the squared TD error of
the taken action, over the decisions.

The trunk runs once per step without gradient; every epoch then trains the head on the same hidden states.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from ...train.engine import make_accelerator
from ..trainer import RLTrainer, fingerprint
from .base import Algorithm, masked_mean, reward_scale
from .ppo import gae

TARGET_TAU = 0.05  # the target network moves this share of the way to the online head after each update


def expected_values(q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Q (batch, seq, A) and the policy's logits (batch, seq, A) -> V(s) = sum_a pi(a|s) Q(s, a) (batch, seq)."""
    return (torch.softmax(logits.float(), dim=-1) * q.float()).sum(-1)


def td_targets(rewards: torch.Tensor, target_q: torch.Tensor, logits: torch.Tensor, action_mask: torch.Tensor,
               gamma: float = 1.0, lam: float = 0.0) -> torch.Tensor:
    """TD(lambda) targets for Q(s_t, a_t): (batch, seq) step rewards, the target network's Q (batch, seq, A), the
    policy's logits (batch, seq, A), decisions (batch, seq) -> (batch, seq) targets, 0 off the decisions.

    lam 0: r_t + gamma * V'(s_next decision) (0 after the last decision); lam 1: the discounted reward-to-go.
    """
    values = expected_values(target_q, logits)
    _, returns = gae(rewards.float(), values, action_mask, gamma, lam)  # GAE's returns are the lambda-returns
    return returns


def td_loss(q: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over the decisions of (Q(s_t, a_t) - target_t)^2; q (batch, seq, A), the rest (batch, seq)."""
    taken = q.gather(-1, actions[..., None]).squeeze(-1)
    return 0.5 * masked_mean((taken - targets.detach()) ** 2, action_mask)


class QHeads(nn.Module):
    """What trains: the model's Q head (``online``), and its target network (a trailing copy, not trained)."""

    def __init__(self, q_head: nn.Module):
        super().__init__()
        self.online = q_head
        self.target = copy.deepcopy(q_head).requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, seq, H) -> Q (batch, seq, A) float32."""
        return self.online(hidden).float()

    @torch.no_grad()
    def update_target(self, tau: float = TARGET_TAU) -> None:
        for t, o in zip(self.target.parameters(), self.online.parameters()):
            t.lerp_(o, tau)


class QLearning(Algorithm):
    """Registry entry for ``--algo q``. Its updates are not policy gradients, so it runs in ``QTrainer``
    (``trainer_class``), which ``bwarea rl`` picks; ``RLTrainer`` refuses it rather than train the policy."""

    name = "q"
    defaults = {"group_size": 4, "epochs": 4, "minibatches": 1}

    def __init__(self, config, trainer=None):
        if not isinstance(trainer, QTrainer):
            raise ValueError("algo 'q' trains a Q head, not the policy: run it with "
                             "bwarea.rl.algorithms.q.QTrainer (what `bwarea rl --algo q` uses), not RLTrainer")
        super().__init__(config)


class QTrainer(RLTrainer):
    """``RLTrainer`` for ``--algo q``: the same rollouts, run folder, checkpoints, resume and guards, but each
    step trains only the model's Q head (added, zero-initialised, when the model has none) by TD against a
    target network. The trained model is written with ``config.value_head = true``.

    Arguments as ``RLTrainer``; ``config.algo`` must be ``"q"``.
    """

    def __init__(self, model, tokenizer, config, out_dir, rewards=None, prompts=None, env_factory=None,
                 base_model: str | None = None, accelerator=None):
        # Not RLTrainer.__init__: it makes the whole policy trainable and prepares it with its optimizer.
        self.config = c = config.resolved()
        if c.algo != "q":
            raise ValueError(f"QTrainer trains the Q head (algo 'q'), got algo {c.algo!r}: use RLTrainer")
        if (rewards is None) == (env_factory is None):
            raise ValueError("give either rewards (with prompts) or an environment, not both or neither")
        if rewards is not None and not prompts:
            raise ValueError("no prompts: give a prompts file or use the shipped model's held-out text")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (load it with bwarea.load_tokenizer)")
        self.acc = accelerator or make_accelerator()
        self.model, self.tokenizer, self.rewards, self.prompts = model, tokenizer, rewards, prompts
        self.env_factory, self.base_model, self.out = env_factory, base_model, Path(out_dir)
        model.to(self.acc.device).eval()
        if model.policy.q_head is None:
            model.policy.add_q_head()
        model.config.value_head = True
        model.requires_grad_(False)
        model.policy.q_head.requires_grad_(True)
        # The starting policy: frozen, as the reference the run (and a resume) is checked against.
        self.reference = copy.deepcopy(model.policy).requires_grad_(False).eval()
        self.frozen = fingerprint(model, skip_prefix="policy.q_head.")
        self.reference_print = fingerprint(self.reference)
        self.algorithm = QLearning(c, trainer=self)
        model.optimize_for_cpu_decoding()
        heads = QHeads(model.policy.q_head)
        optimizer = torch.optim.AdamW(heads.online.parameters(), lr=c.lr, weight_decay=0.0)
        self.module, self.optimizer = self.acc.prepare(heads, optimizer)
        self.step_count = 0
        self.reward_scale, self.updates, self.bad_streak, self.saved_step = 1.0, 0, 0, None
        self.last_bad = None
        rank = self.acc.process_index
        torch.manual_seed(c.seed * 7919 + rank)
        self.generator = torch.Generator(device=self.acc.device).manual_seed(c.seed * 7919 + rank)
        self.prompt_rng = torch.Generator().manual_seed(c.seed * 104729 + rank)
        self.engine, self.log = None, None

    def scale_rewards(self, r) -> None:
        """As ``RLTrainer``'s; when the scale grows, both heads are divided by the same factor (Q is linear in
        the head's weights), so that their values keep their meaning in the new units."""
        biggest = r.rewards.abs().max() if r.rewards.numel() else r.rewards.new_zeros(())
        if self.acc.num_processes > 1:
            biggest = self.acc.gather(biggest[None]).max()
        scale = max(self.reward_scale, reward_scale(float(biggest)))
        if scale > self.reward_scale:
            heads = self.acc.unwrap_model(self.module)
            with torch.no_grad():
                for p in [*heads.online.parameters(), *heads.target.parameters()]:
                    p.div_(scale / self.reward_scale)
            self.reward_scale = scale
        r.rewards = (r.rewards / self.reward_scale).float()

    def step(self) -> dict:
        """One rollout and the Q head's updates on it -> the metrics of the step."""
        c, t0 = self.config, time.perf_counter()
        rollout, reward_means = self.collect()
        self.scale_rewards(rollout)
        seq, mask, m = rollout.sequences, rollout.attention_mask, rollout.action_mask
        policy = self.model.policy
        cos, sin, attn = self.model.positions_and_mask(mask, *seq.shape, seq.device, self.model._dtype())
        heads = self.acc.unwrap_model(self.module)
        with torch.no_grad():
            hidden = policy.final_hidden(seq, cos, sin, attn)  # the frozen trunk, once per step
            logits = policy.head(hidden).float()
            targets = td_targets(rollout.rewards, heads.target(hidden).float(), logits, m, c.gamma, c.lam)
            entropy = masked_mean(-(torch.log_softmax(logits, -1).exp() * torch.log_softmax(logits, -1)).sum(-1), m)
        usable = float(self.acc.reduce(m.any(-1).sum().float(), "sum"))
        losses, bad = [], []
        n, per = len(rollout), len(rollout) // c.minibatches
        for _ in range(c.epochs if usable > 0 else 0):
            order = torch.randperm(n, generator=self.prompt_rng) if c.minibatches > 1 else torch.arange(n)
            order = order.to(seq.device)
            for k in range(c.minibatches):
                rows = order[k * per:(k + 1) * per]
                loss = td_loss(self.module(hidden[rows]), rollout.actions[rows], targets[rows], m[rows])
                if not self._update(loss, bad):
                    continue
                heads.update_target()
                losses.append(loss.detach())
        self._end_step(bad, losses, c.epochs * c.minibatches)
        with torch.no_grad():
            q_taken = heads(hidden).gather(-1, rollout.actions[..., None]).squeeze(-1)
        zero = seq.new_zeros((), dtype=torch.float32)
        # The policy is frozen, so its KL to the start is 0; value_loss is the TD loss.
        metrics = self._metrics(rollout, reward_means, zero, entropy, losses, [], losses, time.perf_counter() - t0)
        metrics.update(updates=len(losses), nonfinite_updates=len(bad),
                       q_taken=float(self.acc.reduce(masked_mean(q_taken, m), "mean")) * self.reward_scale,
                       td_target=float(self.acc.reduce(masked_mean(targets, m), "mean")) * self.reward_scale)
        if self.reward_scale != 1.0:
            metrics["reward_scale"] = self.reward_scale
        return metrics

    def check_frozen(self) -> None:
        """RuntimeError naming any parameter other than the Q head's that changed (the policy included)."""
        changed = [k for k, v in fingerprint(self.model, skip_prefix="policy.q_head.").items()
                   if self.frozen.get(k) != v]
        if changed:
            raise RuntimeError(f"frozen weights changed while training the Q head: {', '.join(changed[:10])}"
                               + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""))


QLearning.trainer_class = QTrainer
ALGORITHM = QLearning
