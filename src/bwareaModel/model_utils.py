"""Released ``create_intention_model``: load a checkpoint (either format) and size its vocabulary as released."""

import math

from .model_hf import IntentionForCausalLM


def create_intention_model(model_name_or_path, tokenizer, dropout=None, flash_attn=False, dtype=None):
    """-> an ``IntentionForCausalLM`` (bwarea's model; ``model(input_ids, attention_mask)`` means what it meant
    in the released code: the world model under the policy's actions, see ``forward_under_policy``)."""
    # dropout and flash_attn are accepted for signature compatibility; bwarea uses PyTorch SDPA and no dropout.
    model = IntentionForCausalLM.from_pretrained(model_name_or_path, dtype=dtype)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    # The released loader rounds every embedding and the LM head up to a multiple of 8 of len(tokenizer).
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model
