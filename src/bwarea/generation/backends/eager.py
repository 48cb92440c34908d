"""The reference decode step: the model's own blocks, one position at a time, over StaticKVCaches."""

from __future__ import annotations

import torch

from ..cache import make_caches
from . import DecodeStep, decode_positions


class EagerStep(DecodeStep):
    """``Block.forward`` for the fed position, attending to the cache columns up to it (left padding masked)."""

    name = "eager"

    def __init__(self, model, rows, width, steps, attention_mask, run_policy):
        self.model, self.width = model, width
        length = width + steps
        self.policy_caches = make_caches(model, model.policy, rows, length) if run_policy else None
        self.world_caches = make_caches(model, model.world_model, rows, length)
        device, dtype = model.world_model.embed_tokens.weight.device, model.world_model.embed_tokens.weight.dtype
        self.cos, self.sin = model.rotary(decode_positions(attention_mask, rows, width, steps, device), dtype)
        self.key_valid = None  # (rows, length) bool: False at prompt padding
        if attention_mask is not None:
            self.key_valid = torch.ones(rows, length, dtype=torch.bool, device=device)
            self.key_valid[:, :width] = attention_mask.bool()

    def _inputs(self, i):
        col = self.width + i
        mask = None if self.key_valid is None else self.key_valid[:, None, None, :col + 1]
        return col, self.cos[:, :, i:i + 1], self.sin[:, :, i:i + 1], mask

    def lower(self, tokens, i, policy=True):
        col, cos, sin, mask = self._inputs(i)
        ids, w = tokens[:, None], self.model.world_model
        writes = [c.at(col) for c in self.world_caches[:w.action_layer]]
        hidden = w.run(w.embed_tokens(ids), cos, sin, mask, writes, 0, w.action_layer)
        if not policy:
            return None, hidden
        logits = self.model.policy(ids, cos, sin, mask, [c.at(col) for c in self.policy_caches])
        return logits[:, 0], hidden

    def upper(self, hidden, actions, i):
        col, cos, sin, mask = self._inputs(i)
        w = self.model.world_model
        x = w.inject(hidden, self.model.action_codebook(actions)[:, None])
        writes = [None] * w.action_layer + [c.at(col) for c in self.world_caches[w.action_layer:]]
        h = w.norm(w.run(x, cos, sin, mask, writes, w.action_layer))
        return w.lm_head(h[:, 0]).float()
