"""The released BWArea format, translated: key renames, fused projections, config names. No model code.

Released checkpoints (``IntentionForCausalLM``, transformers 4.36) store a Llama config with
``num_code``/``num_dim`` and the keys ``model.transformer.*`` (world model), ``model.transformer_action_enc.*``
(inverse dynamics), ``model.transformer_policy.*`` (policy) and a few single matrices. bwarea names the
parts as the paper does and fuses q/k/v and gate/up into one matrix each.
"""

from __future__ import annotations

import re

import torch

# Released trunk prefix -> bwarea trunk prefix; inside a trunk wte/h/ln_f become embed_tokens/layers/norm.
TRUNKS = {
    "model.transformer.": "world_model.",
    "model.transformer_action_enc.": "inverse_dynamics.",
    "model.transformer_policy.": "policy.",
}
TRUNK_PARTS = {"wte.": "embed_tokens.", "h.": "layers.", "ln_f.": "norm."}
SINGLES = {
    "lm_head.weight": "world_model.lm_head.weight",
    "model.unpress_layer.weight": "world_model.action_proj.weight",
    "model.dynamics_layer.weight": "world_model.dynamics.weight",
    "model.dynamics_norm.weight": "world_model.dynamics_norm.weight",
    "model.press_layer.weight": "inverse_dynamics.press.weight",
    "model.transformer_policy_layer.weight": "policy.head.weight",
    "model.action_code_book.embed.weight": "action_codebook.embed.weight",
}
# Present in released files, read by nothing.
DROPPED = re.compile(r"^model\.embed_tokens\.weight$|rotary_emb\.inv_freq$")


def is_released_config(config_dict: dict) -> bool:
    """A released BWArea config: a Llama model type carrying the action fields (or the released class)."""
    return config_dict.get("model_type") == "llama" and (
        "num_code" in config_dict or "IntentionForCausalLM" in (config_dict.get("architectures") or []))


def rename_released_key(key: str) -> str | None:
    """Released key -> bwarea key (before q/k/v fusion); None for keys bwarea drops."""
    if DROPPED.search(key):
        return None
    if key in SINGLES:
        return SINGLES[key]
    for old, new in TRUNKS.items():
        if key.startswith(old):
            rest = key[len(old):]
            for part_old, part_new in TRUNK_PARTS.items():
                if rest.startswith(part_old):
                    return new + part_new + rest[len(part_old):]
    return key  # unknown keys pass through, so the loader can name them as unexpected


def fuse_llama_projections(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse ``*.self_attn.{q,k,v}_proj`` into ``qkv_proj`` and ``*.mlp.{gate,up}_proj`` into ``gate_up_proj``."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("self_attn.q_proj.weight")]:
        base = key[: -len("q_proj.weight")]
        parts = [out.pop(base + f"{p}_proj.weight", None) for p in "qkv"]
        if any(p is None for p in parts):
            missing = [base + f"{p}_proj.weight" for p, t in zip("qkv", parts) if t is None]
            raise KeyError(f"checkpoint is missing {missing}")
        out[base + "qkv_proj.weight"] = torch.cat(parts, dim=0)
    for key in [k for k in state_dict if k.endswith("mlp.gate_proj.weight")]:
        base = key[: -len("gate_proj.weight")]
        up = out.pop(base + "up_proj.weight", None)
        if up is None:
            raise KeyError(f"checkpoint is missing {base}up_proj.weight")
        out[base + "gate_up_proj.weight"] = torch.cat([out.pop(key), up], dim=0)
    return out


def convert_released_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released ``IntentionForCausalLM`` state dict -> a bwarea ``BWAreaForCausalLM`` state dict."""
    renamed = {}
    for key, value in state_dict.items():
        new = rename_released_key(key)
        if new is not None:
            renamed[new] = value
    return fuse_llama_projections(renamed)


def to_released_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A bwarea state dict -> the released format's keys and unfused projections (``convert_released_state_dict``
    undone), for tools that write released-format checkpoints (the benchmarks' random 2.7B one, round-trip
    tests). ``config``: the model's BWAreaConfig, for the q/k/v split."""
    singles = {new: old for old, new in SINGLES.items()}
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    out = {}
    for key, value in state_dict.items():
        if key in singles:
            out[singles[key]] = value
            continue
        trunk = next((old for old, new in TRUNKS.items() if key.startswith(new)), None)
        if trunk is None:
            out[key] = value
            continue
        rest = key[len(TRUNKS[trunk]):]
        part = next(old for old, new in TRUNK_PARTS.items() if rest.startswith(new))
        name = trunk + part + rest[len(TRUNK_PARTS[part]):]
        if name.endswith("self_attn.qkv_proj.weight"):
            base = name[: -len("qkv_proj.weight")]
            for p, t in zip("qkv", value.split([q, kv, kv], dim=0)):
                out[base + f"{p}_proj.weight"] = t.contiguous()
        elif name.endswith("mlp.gate_up_proj.weight"):
            base = name[: -len("gate_up_proj.weight")]
            gate, up = value.chunk(2, dim=0)
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate.contiguous(), up.contiguous()
        else:
            out[name] = value
    return out


def llama_trunk_state_dict(llama_state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers ``LlamaForCausalLM`` weights -> a bwarea trunk under ``prefix`` (e.g. "world_model.").

    Used by the parity tests and to initialise a BWArea part from a plain Llama."""
    out = {}
    for key, value in llama_state_dict.items():
        if key.startswith("model."):
            out[prefix + key[len("model."):]] = value
        elif key == "lm_head.weight":
            out[prefix + "lm_head.weight"] = value
    return fuse_llama_projections(out)
