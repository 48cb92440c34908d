"""Stage 1: the world model, the inverse dynamics and the action codebook, trained together.

    loss = NLL of the world model under the inverse-dynamics actions          (forward_inverse)
         + ||sg(z) - e||^2  (codebook)  + 0.25 ||z - sg(e)||^2  (commitment)   (VQ-VAE; or EMA codebook updates)
         - entropy_bonus * H(mean soft assignment)                              (optional)

Codebook collapse (few actions used) is the known failure. Remedies here: k-means initialisation of the
codebook from the inverse dynamics' first outputs, resetting codes that went unused to recent latents, and an
optional bonus for spreading the (soft) usage. Codes used and usage perplexity are logged throughout.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BWAreaConfig
from ..model import BWAreaForCausalLM
from .loop import Stage, copy_tokenizer, save_state_dict
from .settings import PretrainConfig
from .vq import kmeans, soft_usage_entropy, usage_metrics


def default_intermediate(hidden: int) -> int:
    """SwiGLU width of about 8/3 x hidden, rounded up to a multiple of 64 (Llama's rule)."""
    return 64 * math.ceil(8 * hidden / 3 / 64)


def model_config(config: PretrainConfig, tokenizer) -> BWAreaConfig:
    """The BWArea config for a fresh stage-1 model (vocabulary and special ids from the tokenizer)."""
    return BWAreaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size or default_intermediate(config.hidden_size),
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions or config.block_size, num_actions=config.num_actions,
        codebook_dim=config.codebook_dim, inverse_layers=config.inverse_layers, policy_layers=config.policy_layers,
        action_layer=config.action_layer, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


class WorldModelObjective(nn.Module):
    """Stage-1 objective around a BWAreaForCausalLM: forward(input_ids (batch, seq)) -> {"loss", "stats"}.

    Statistics are sums (so they add over micro-batches and processes): nll_sum, tokens, commit_sum,
    code_counts (num_actions,), and code_sums (num_actions, codebook_dim) with EMA codebooks.
    """

    def __init__(self, model: BWAreaForCausalLM, config: PretrainConfig):
        super().__init__()
        self.model = model
        # The policy is stage 2's; frozen here so data-parallel wrappers see no parameters without gradients.
        model.policy.requires_grad_(False)
        self.commitment, self.entropy_bonus = config.commitment, config.entropy_bonus
        self.ema = config.codebook == "ema"
        n = model.config.num_actions
        # Code usage since the last dead-code check; a buffer, so a resumed run checks the same window.
        self.register_buffer("usage_window", torch.zeros(n))
        if self.ema:
            model.action_codebook.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(n))
            self.register_buffer("ema_sum", model.action_codebook.embed.weight.detach().clone())
        self.recent_latents: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, evaluation: bool = False) -> dict:
        out = self.model.forward_inverse(input_ids, labels=input_ids)
        # The last position's action has no next token to explain: it takes no part in the VQ terms.
        z, index = out.action_latents[:, :-1].float(), out.action_index[:, :-1]
        codes = self.model.action_codebook(index).float()
        commit = F.mse_loss(z, codes.detach())
        loss = out.loss + self.commitment * commit
        if not self.ema:
            loss = loss + F.mse_loss(codes, z.detach())
        if self.entropy_bonus > 0:
            loss = loss - self.entropy_bonus * soft_usage_entropy(z, self.model.action_codebook.embed.weight)
        tokens = index.numel()
        flat_index = index.reshape(-1)
        stats = {"nll_sum": out.loss.detach() * tokens, "tokens": torch.tensor(float(tokens), device=z.device),
                 "commit_sum": commit.detach() * tokens,
                 "code_counts": torch.bincount(flat_index, minlength=self.usage_window.numel()).float()}
        if self.training:
            flat_z = z.detach().reshape(-1, z.shape[-1])
            # A strided sample of this batch's latents: the candidates for dead-code resets.
            self.recent_latents = flat_z[:: max(1, len(flat_z) // 2048)][:2048]
            if self.ema:
                stats["code_sums"] = torch.zeros_like(self.ema_sum).index_add_(0, flat_index, flat_z)
        return {"loss": loss, "stats": stats}

    @staticmethod
    def metrics(stats: dict) -> dict:
        nll = float(stats["nll_sum"] / stats["tokens"])
        return {"nll": nll, "id_ppl": math.exp(min(nll, 50.0)), "commit": float(stats["commit_sum"] / stats["tokens"]),
                **usage_metrics(stats["code_counts"])}


class PretrainStage(Stage):
    name = "pretrain"

    def build(self, config: PretrainConfig, tokenizer) -> nn.Module:
        self.config = config
        return WorldModelObjective(BWAreaForCausalLM(model_config(config, tokenizer)), config)

    @torch.no_grad()
    def initialise(self, objective: WorldModelObjective, batches, accelerator) -> None:
        if not self.config.kmeans_init:
            return
        model = objective.model
        latents = []
        for _, ids in zip(range(self.config.kmeans_batches), batches):
            latents.append(model.infer_actions(ids)[1][:, :-1].reshape(-1, model.config.codebook_dim))
        x = torch.cat(latents)
        x = x[:: max(1, len(x) // 20000)]  # k-means on at most ~20k latents: ample for 64 centroids
        centroids, counts = kmeans(x, model.config.num_actions, seed=self.config.seed)
        model.action_codebook.embed.weight.copy_(centroids)
        if objective.ema:
            objective.ema_count.copy_(counts.clamp_min(1))
            objective.ema_sum.copy_(centroids * objective.ema_count[:, None])

    @torch.no_grad()
    def after_step(self, objective: WorldModelObjective, step: int, stats: dict, accelerator, optimizer) -> dict:
        codebook = objective.model.action_codebook.embed.weight
        if objective.ema:
            decay = self.config.ema_decay
            objective.ema_count.mul_(decay).add_(stats["code_counts"], alpha=1 - decay)
            objective.ema_sum.mul_(decay).add_(stats["code_sums"], alpha=1 - decay)
            # Laplace smoothing keeps rare codes from dividing by ~0.
            n = objective.ema_count.sum()
            count = (objective.ema_count + 1e-5) / (n + codebook.shape[0] * 1e-5) * n
            codebook.copy_(objective.ema_sum / count[:, None])
        every = self.config.dead_code_every
        if not every:
            return {}
        objective.usage_window.add_(stats["code_counts"])
        if step % every:
            return {}
        window = objective.usage_window
        dead = window < self.config.dead_code_threshold * window.sum() / window.numel()
        window.zero_()
        n_dead = int(dead.sum())
        if n_dead == 0 or objective.recent_latents is None:
            return {"codes_reset": 0}
        full = (objective.model.config.num_actions, objective.model.config.codebook_dim)
        if codebook.shape != full or type(codebook.data) is not torch.Tensor:
            return {}  # a sharded codebook (FSDP, ZeRO-3) is not edited in place; the other remedies still apply
        candidates = accelerator.gather(objective.recent_latents.contiguous()).float()
        # Same generator on every process: each picks the same replacements.
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        pick = torch.randperm(len(candidates), generator=g)[:n_dead].to(candidates.device)
        if len(pick) < n_dead:
            pick = pick.repeat(math.ceil(n_dead / len(pick)))[:n_dead]
        rows = dead.nonzero().squeeze(1)
        codebook[rows] = candidates[pick].to(codebook.dtype)
        if objective.ema:
            objective.ema_count[rows] = 1.0
            objective.ema_sum[rows] = codebook[rows].float()
        # Fresh optimiser moments for the reset rows, so stale momentum does not drag them back.
        state = optimizer.state.get(codebook) if hasattr(optimizer, "state") else None
        for key in ("exp_avg", "exp_avg_sq"):
            if state and key in state and state[key].shape == codebook.shape:
                state[key][rows] = 0
        return {"codes_reset": n_dead}

    def save(self, objective, state_dict, out: Path, tokenizer, config) -> None:
        save_state_dict(objective.model, state_dict, out, config.save_dtype)
        copy_tokenizer(config.tokenizer, out)
