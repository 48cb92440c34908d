"""Stage 2: behaviour cloning of the policy, with the world model and inverse dynamics frozen.

    loss = CE(policy logits at t, inverse-dynamics action at t)
           (or soft targets: from codebook distances, or the world model's posterior over actions)

The inverse dynamics labels every position of the stage-1 data with its action; the policy learns to predict
that action from the tokens so far. Its accuracy and cross-entropy are logged; at evaluation the exact LM
perplexity of the whole model (``lm_log_likelihood``) is measured too, since that is what the policy is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import BWAreaForCausalLM, Policy
from .loop import Stage, TrainConfig, copy_tokenizer, save_state_dict
from .pretrain import squared_distances, usage_metrics


@dataclass
class BCConfig(TrainConfig):
    """Stage-2 settings. ``model`` is the stage-1 folder; the tokenizer defaults to the one stored there.

    policy_init: "world" copies the world model's embedding, first blocks and final norm into the policy
    (a trained language model is a better start than noise); "keep" trains the policy as stage 1 left it.
    policy_layers: rebuild the policy with this many blocks (None: keep the model's).
    targets: what the policy imitates at each position t:
      "inverse"    the inverse-dynamics action (cross-entropy; the paper's behaviour cloning);
      "soft"       softmax(-||z_t - e_a||^2 / soft_temperature) over the codebook distances of the latent;
      "posterior"  the world model's posterior over actions given the true next token,
                   q(a) ∝ pi(a | x_<=t) p_world(x_t+1 | x_<=t, a). Its loss is exactly the LM negative
                   log-likelihood -log sum_a pi(a) p_world(x_t+1 | a), so it optimises lm_ppl itself
                   (at num_actions world-model upper halves per position: slower steps).
    """

    model: str = ""
    policy_init: str = "world"
    policy_layers: int | None = None
    targets: str = "inverse"
    soft_temperature: float = 1.0
    eval_lm: bool = True
    # The shape comes from --model; shape settings given anyway must agree with it (a guard for scripts).
    hidden_size: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate_size: int | None = None

    def check(self) -> None:
        if not self.tokenizer and self.model:
            self.tokenizer = self.model
        super().check()
        if not self.model:
            raise ValueError("bc needs --model: the stage-1 (pretrain) output folder")
        if Path(self.model).resolve() == Path(self.out).resolve():
            raise ValueError("bc --out must be a new folder, not the stage-1 --model folder it reads")
        if self.policy_init not in ("world", "keep"):
            raise ValueError(f"policy_init must be 'world' or 'keep', got {self.policy_init!r}")
        if self.targets not in ("inverse", "soft", "posterior"):
            raise ValueError(f"targets must be inverse, soft or posterior, got {self.targets!r}")
        if self.soft_temperature <= 0:
            raise ValueError(f"soft_temperature must be > 0, got {self.soft_temperature}")
        if self.policy_layers is not None and self.policy_layers < 1:
            raise ValueError(f"policy_layers must be >= 1, got {self.policy_layers}")


class PolicyCloning(nn.Module):
    """forward(input_ids (batch, seq)) -> {"loss", "stats"}: the policy imitating the inverse dynamics.

    stats (sums): ce_sum, correct, tokens, code_counts (num_actions,); lm_nll_sum with "posterior" targets
    (the loss) and at evaluation.
    """

    def __init__(self, model: BWAreaForCausalLM, targets: str = "inverse", soft_temperature: float = 1.0,
                 eval_lm: bool = True):
        super().__init__()
        self.model = model
        self.targets, self.soft_temperature, self.eval_lm = targets, soft_temperature, eval_lm
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
        if self.targets == "soft":
            with torch.no_grad():
                dist = squared_distances(latents.float().reshape(-1, latents.shape[-1]),
                                         self.model.action_codebook.embed.weight.float())
                soft = torch.softmax(-dist / self.soft_temperature, dim=-1)
            loss = -(soft * torch.log_softmax(flat_logits, dim=-1)).sum(-1).mean()
        if self.targets == "posterior" and not evaluation:
            # The frozen world model carries no gradient; only log pi inside the logsumexp does.
            lm_nll = -self.model.lm_log_likelihood(input_ids).float().sum()
            stats["lm_nll_sum"] = lm_nll.detach()
            loss = lm_nll / tokens
        elif evaluation and self.eval_lm:
            with torch.no_grad():
                stats["lm_nll_sum"] = -self.model.lm_log_likelihood(input_ids).float().sum()
        return {"loss": loss, "stats": stats}

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
            out["lm_ppl"] = math.exp(min(float(stats["lm_nll_sum"] / tokens), 50.0))
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
        return PolicyCloning(model, config.targets, config.soft_temperature, config.eval_lm).train()

    def initialise(self, objective: PolicyCloning, batches, accelerator) -> None:
        if self.config.policy_init == "world":
            init_policy_from_world(objective.model)

    def save(self, objective, state_dict, out: Path, tokenizer, config: BCConfig) -> None:
        save_state_dict(objective.model, state_dict, out, config.save_dtype)
        copy_tokenizer(config.tokenizer, out)
