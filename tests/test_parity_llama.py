"""The blocks against transformers' Llama: the same weights give the same logits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bwarea import BWAreaForCausalLM
from bwarea.compat import llama_trunk_state_dict
from conftest import tiny_config


@pytest.mark.parametrize("kv_heads", [6, 3, 1])
def test_world_model_trunk_matches_llama(kv_heads):
    torch.manual_seed(0)
    cfg = tiny_config(num_key_value_heads=kv_heads, num_hidden_layers=4)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    model = BWAreaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(
        llama_trunk_state_dict(llama.state_dict(), "world_model."), strict=False)
    assert not unexpected
    assert all(not k.startswith("world_model.") or k.split(".")[1] in ("action_proj", "dynamics", "dynamics_norm")
               for k in missing)

    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: Llama and bwarea both take positions from the mask here
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = llama(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        wm = model.world_model
        cos, sin, attn = model.positions_and_mask(mask, *ids.shape, ids.device, torch.float32)
        ours = wm.lm_head(wm.norm(wm.run(wm.embed_tokens(ids), cos, sin, attn)))
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=1e-4)
