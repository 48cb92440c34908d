"""Stage 2: behaviour cloning of the policy, with the world model and inverse dynamics frozen.

    loss = CE(policy logits at t, inverse-dynamics action at t)
           (or soft targets: from codebook distances, or the world model's posterior over actions)

The inverse dynamics labels every position of the stage-1 data with its action; the policy learns to predict
that action from the tokens so far. Its accuracy and cross-entropy are logged; at evaluation the exact LM
perplexity of the whole model (``lm_log_likelihood``) is measured too, since that is what the policy is for.

By default the last ``posterior_fraction`` of the steps then train on the world model's posterior over actions
(the exact LM likelihood), with the learning rate warmed up again: cloning the inverse dynamics is the cheap,
fast start; the posterior phase fits what the policy is for (held-out lm_ppl, docs/training.md "Stage 2").
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import BWAreaForCausalLM, Policy
from .loop import Stage, copy_tokenizer, save_state_dict, warmup_cosine
from .settings import BCConfig
from .vq import squared_distances, usage_metrics


class PolicyCloning(nn.Module):
    """forward(input_ids (batch, seq)) -> {"loss", "stats"}: the policy imitating the inverse dynamics.

    stats (sums): ce_sum, correct, tokens, code_counts (num_actions,); lm_nll_sum with "posterior" targets
    (the loss) and at evaluation.

    posterior_positions: a posterior step scores this many positions per block, drawn at random (None: all).
    The loss is then an unbiased estimate of the all-position one, for about that share of the world-model work.
    """

    def __init__(self, model: BWAreaForCausalLM, targets: str = "inverse", soft_temperature: float = 1.0,
                 eval_lm: bool = True, posterior_from: int | None = None, posterior_positions: int | None = None):
        super().__init__()
        self.model = model
        self.targets, self.soft_temperature, self.eval_lm = targets, soft_temperature, eval_lm
        self.posterior_positions = posterior_positions
        # From optimiser step ``posterior_from`` on, the targets are the posterior. The steps done live in a
        # buffer so that they travel with the checkpoint: a resumed run continues in the right phase.
        self.posterior_from = posterior_from
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        for frozen in (model.world_model, model.inverse_dynamics, model.action_codebook):
            frozen.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, evaluation: bool = False) -> dict:
        with torch.no_grad():
            index, latents, _ = self.model.infer_actions(input_ids)
        # The last position has no next token, so no inverse-dynamics action to imitate.
        target, latents = index[:, :-1], latents[:, :-1]
        logits = self.model.policy_logits(input_ids)[:, :-1].float()
        flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        ce = F.cross_entropy(flat_logits, flat_target)
        tokens = flat_target.numel()
        stats = {"ce_sum": ce.detach() * tokens, "tokens": torch.tensor(float(tokens), device=logits.device),
                 "correct": (flat_logits.argmax(-1) == flat_target).sum().float(),
                 "code_counts": torch.bincount(flat_target, minlength=logits.shape[-1]).float()}
        loss = ce
        targets = self.current_targets()
        if targets == "soft":
            with torch.no_grad():
                dist = squared_distances(latents.float().reshape(-1, latents.shape[-1]),
                                         self.model.action_codebook.embed.weight.float())
                soft = torch.softmax(-dist / self.soft_temperature, dim=-1)
            loss = -(soft * torch.log_softmax(flat_logits, dim=-1)).sum(-1).mean()
        if targets == "posterior" and not evaluation:
            # The frozen world model carries no gradient; only log pi inside the logsumexp does.
            scored, positions = input_ids.shape[1] - 1, None
            if self.posterior_positions is not None and self.posterior_positions < scored:
                # The same random positions for every row of the batch: one query set per world-model pass.
                # torch's generator draws them, so a resumed run (accelerate restores it) draws the same ones.
                positions = torch.randperm(scored)[:self.posterior_positions].sort().values
            lm_ll = self.model.lm_log_likelihood(input_ids, positions=positions).float()
            lm_nll, lm_tokens = -lm_ll.sum(), lm_ll.numel()
            stats["lm_nll_sum"] = lm_nll.detach()
            stats["lm_tokens"] = torch.tensor(float(lm_tokens), device=logits.device)
            loss = lm_nll / lm_tokens
        elif evaluation and self.eval_lm:
            with torch.no_grad():
                stats["lm_nll_sum"] = -self.model.lm_log_likelihood(input_ids).float().sum()
                stats["lm_tokens"] = stats["tokens"]
        return {"loss": loss, "stats": stats}

    def current_targets(self) -> str:
        """The targets of the step about to run: --targets, or "posterior" once its phase has begun."""
        if self.posterior_from is not None and int(self.steps_done) >= self.posterior_from:
            return "posterior"
        return self.targets

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen parts stay in eval mode whatever the loop asks.
        for frozen in (self.model.world_model, self.model.inverse_dynamics, self.model.action_codebook):
            frozen.eval()
        return self

    @staticmethod
    def metrics(stats: dict) -> dict:
        tokens = stats["tokens"]
        ce = float(stats["ce_sum"] / tokens)
        out = {"bc_ce": ce, "bc_accuracy": float(stats["correct"] / tokens), **usage_metrics(stats["code_counts"])}
        if "lm_nll_sum" in stats:
            # Its own token count: a logging window that spans the switch to the posterior phase has the LM
            # likelihood of its posterior steps only.
            out["lm_ppl"] = math.exp(min(float(stats["lm_nll_sum"] / stats["lm_tokens"]), 50.0))
        return out


@torch.no_grad()
def init_policy_from_world(model: BWAreaForCausalLM) -> int:
    """Copy the world model's token embedding, its first blocks and final norm into the policy.

    -> the number of blocks copied (the policy's extra blocks, if it is deeper, keep their own weights).
    """
    policy, world = model.policy, model.world_model
    policy.embed_tokens.weight.copy_(world.embed_tokens.weight)
    policy.norm.weight.copy_(world.norm.weight)
    n = min(len(policy.layers), len(world.layers))
    for i in range(n):
        policy.layers[i].load_state_dict(world.layers[i].state_dict())
    return n


class BCStage(Stage):
    name = "bc"
    shown = ("bc_ce", "bc_accuracy", "lm_ppl")

    def build(self, config: BCConfig, tokenizer) -> nn.Module:
        model = BWAreaForCausalLM.from_pretrained(config.model, dtype=torch.float32)
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                             f"{model.config.vocab_size}: give the tokenizer the model was trained with")
        if config.policy_layers is not None and config.policy_layers != model.config.policy_layers:
            model.config.policy_layers = config.policy_layers
            model.policy = Policy(model.config)
            model.policy.apply(model._init_weights)
        shape = {"hidden_size": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                 "kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}
        wrong = [f"{ours}={getattr(config, ours)} but the model has {getattr(model.config, theirs)}"
                 for ours, theirs in shape.items()
                 if getattr(config, ours) is not None and getattr(config, ours) != getattr(model.config, theirs)]
        if wrong:
            raise ValueError(f"the shape given does not match the model in {config.model}: " + "; ".join(wrong))
        self.config = config
        tail = config.posterior_steps()
        return PolicyCloning(model, config.targets, config.soft_temperature, config.eval_lm,
                             posterior_from=config.max_steps - tail if tail else None,
                             posterior_positions=config.posterior_positions).train()

    def lr_factor(self, config: BCConfig):
        """Warm-up + cosine over the --targets phase; with a posterior phase, again over it (a short warm-up,
        peak --posterior-lr): the new objective starts at a high learning rate, as a separate run would."""
        tail = config.posterior_steps()
        first = warmup_cosine(config.warmup_steps, config.max_steps - tail, config.min_lr_ratio)
        if not tail:
            return first
        start, scale = config.max_steps - tail, (config.posterior_lr or config.lr) / config.lr
        second = warmup_cosine(min(config.warmup_steps, max(1, tail // 10)), tail, config.min_lr_ratio)
        return lambda step: first(step) if step < start else scale * second(step - start)

    def after_step(self, objective: PolicyCloning, step: int, stats: dict, accelerator, optimizer) -> dict:
        objective.steps_done.fill_(step)
        if objective.posterior_from is None:
            return {}
        return {"posterior_phase": float(step > objective.posterior_from)}  # the targets of the step just done

    def initialise(self, objective: PolicyCloning, batches, accelerator) -> None:
        if self.config.policy_init == "world":
            init_policy_from_world(objective.model)

    def save(self, objective, state_dict, out: Path, tokenizer, config: BCConfig) -> None:
        save_state_dict(objective.model, state_dict, out, config.save_dtype)
        copy_tokenizer(config.tokenizer, out)
