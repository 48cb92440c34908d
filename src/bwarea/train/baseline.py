"""The side-by-side baseline: a plain transformers LlamaForCausalLM of the world model's shape.

Same blocks, same tokens, same settings as stage 1 (``bwarea pretrain --baseline llama``), so its perplexity
and tokens/s are the yardsticks for BWArea's ``lm_ppl`` and stage-1 throughput.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .loop import Stage, copy_tokenizer, save_state_dict
from .pretrain import PretrainConfig, default_intermediate


def llama_config(config: PretrainConfig, tokenizer) -> LlamaConfig:
    """The Llama config with the world model's shape (``layers`` blocks) and the tokenizer's vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size or default_intermediate(config.hidden_size),
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads or config.heads,
        max_position_embeddings=config.max_positions or config.block_size, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.02, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


class LanguageModelObjective(nn.Module):
    """forward(input_ids (batch, seq)) -> {"loss": mean next-token NLL, "stats": {nll_sum, tokens}}."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, evaluation: bool = False) -> dict:
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
        return {"loss": loss, "stats": {"nll_sum": loss.detach().float() * tokens,
                                        "tokens": torch.tensor(float(tokens), device=input_ids.device)}}

    @staticmethod
    def metrics(stats: dict) -> dict:
        nll = float(stats["nll_sum"] / stats["tokens"])
        return {"nll": nll, "ppl": math.exp(min(nll, 50.0))}


class BaselineStage(Stage):
    name = "baseline-llama"

    def build(self, config: PretrainConfig, tokenizer) -> nn.Module:
        model = LlamaForCausalLM._from_config(llama_config(config, tokenizer), attn_implementation="sdpa")
        return LanguageModelObjective(model)

    def save(self, objective, state_dict, out: Path, tokenizer, config) -> None:
        save_state_dict(objective.model, state_dict, out, config.save_dtype)
        copy_tokenizer(config.tokenizer, out)
