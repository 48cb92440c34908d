"""BWAreaConfig: the shape of the three parts of a BWArea model.

A BWArea config is a Llama config plus the action space. The released checkpoints store it as
``model_type: "llama"`` with ``num_code`` / ``num_dim`` / ``action_dim``; those names are accepted here and
translated, so one config class reads both formats.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# Released name -> bwarea name.
RELEASED_FIELD_NAMES = {"num_code": "num_actions", "num_dim": "codebook_dim"}

# Integer fields and their least value; float fields and whether 0 is allowed (all must be finite).
INT_FIELDS = {"vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
              "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 1, "num_actions": 1,
              "codebook_dim": 1, "inverse_layers": 1, "policy_layers": 1, "action_layer": 0}
FLOAT_FIELDS = {"rope_theta": False, "rms_norm_eps": False, "initializer_range": True, "action_temperature": False}


class BWAreaConfig(PretrainedConfig):
    """Configuration of a BWArea model.

    World model: ``num_hidden_layers`` Llama blocks, the action enters before block ``action_layer``.
    Inverse dynamics: ``inverse_layers`` blocks (default L//2). Policy: ``policy_layers`` blocks (default L).
    Actions: ``num_actions`` codebook rows of width ``codebook_dim``.
    ``value_head``: the policy also has a learned action-value head Q(s, .) (``bwarea rl --algo q``).
    ``action_temperature``: the temperature at which the policy's actions are sampled when a caller names none
    (generate, ``bwarea generate``, the server, best-of-n search). 1 is the released behaviour; a model whose
    policy is flatter than its text warrants ships a lower one, as a transformers model ships its sampling
    defaults in generation_config.json. RL always samples at 1: its log-probabilities are the policy's own.
    """

    model_type = "bwarea"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 22,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        num_actions: int = 64,
        codebook_dim: int = 32,
        inverse_layers: int | None = None,
        policy_layers: int | None = None,
        action_layer: int | None = None,
        initializer_range: float = 0.02,
        value_head: bool = False,
        action_temperature: float = 1.0,
        **kwargs,
    ):
        for released, ours in RELEASED_FIELD_NAMES.items():
            if released in kwargs:
                value = kwargs.pop(released)
                if ours == "num_actions":
                    num_actions = value
                else:
                    codebook_dim = value
        # The released config carries an unused `action_dim` and a Llama rope block; keep neither.
        kwargs.pop("action_dim", None)
        rope_parameters = kwargs.pop("rope_parameters", None) or kwargs.pop("rope_scaling", None)
        if isinstance(rope_parameters, dict) and rope_parameters.get("rope_theta"):
            rope_theta = rope_parameters["rope_theta"]
        # Types and ranges first, so a wrong value is named here rather than failing later in the model.
        check_fields(dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
            rope_theta=rope_theta, rms_norm_eps=rms_norm_eps, num_actions=num_actions, codebook_dim=codebook_dim,
            inverse_layers=inverse_layers, policy_layers=policy_layers, action_layer=action_layer,
            initializer_range=initializer_range, action_temperature=action_temperature))
        if not isinstance(value_head, bool):
            raise ValueError(f"BWAreaConfig: value_head must be true or false, got {value_head!r}")
        for key in ("dtype", "torch_dtype"):
            if kwargs.get(key) is not None:
                check_dtype(key, kwargs[key])
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.num_actions = num_actions
        self.codebook_dim = codebook_dim
        self.inverse_layers = num_hidden_layers // 2 if inverse_layers is None else inverse_layers
        self.policy_layers = num_hidden_layers if policy_layers is None else policy_layers
        self.action_layer = num_hidden_layers // 2 if action_layer is None else action_layer
        self.initializer_range = initializer_range
        self.value_head = value_head
        self.action_temperature = float(action_temperature)
        for llama_only in ("model_type", "architectures", "pretraining_tp", "hidden_act", "attention_bias",
                           "attention_dropout", "mlp_bias", "head_dim", "use_cache"):
            kwargs.pop(llama_only, None)
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        super().__init__(**kwargs)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        checks = [
            (self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads "
             f"{self.num_key_value_heads}"),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary positions"),
            (self.num_actions >= 1, f"num_actions must be >= 1, got {self.num_actions}"),
            (self.codebook_dim >= 1, f"codebook_dim must be >= 1, got {self.codebook_dim}"),
            (0 <= self.action_layer <= self.num_hidden_layers,
             f"action_layer {self.action_layer} must lie in [0, num_hidden_layers={self.num_hidden_layers}]"),
            (self.inverse_layers >= 1, f"inverse_layers must be >= 1, got {self.inverse_layers}"),
            (self.policy_layers >= 1, f"policy_layers must be >= 1, got {self.policy_layers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"BWAreaConfig: {message}")

    @classmethod
    def from_released_dict(cls, config_dict: dict) -> "BWAreaConfig":
        """Translate a released (``model_type: llama`` + ``num_code``) config dict; raise if it lacks actions."""
        missing = [k for k in ("num_code", "num_dim") if k not in config_dict]
        if missing:
            raise ValueError(
                f"config has model_type {config_dict.get('model_type')!r} but no action fields {missing}: "
                "it is not a BWArea checkpoint (a BWArea config needs num_code/num_dim or num_actions/codebook_dim)"
            )
        return cls(**{k: v for k, v in config_dict.items() if k not in ("transformers_version", "torch_dtype")},
                   dtype=config_dict.get("torch_dtype") or config_dict.get("dtype"))


def check_fields(values: dict) -> None:
    """Raise ValueError naming the first field of the wrong type or out of range (None: use the default)."""
    for name, value in values.items():
        if value is None and name in ("num_key_value_heads", "inverse_layers", "policy_layers", "action_layer"):
            continue
        if name in INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"BWAreaConfig: {name} must be an integer, got {value!r} ({type(value).__name__})")
            if value < INT_FIELDS[name]:
                raise ValueError(f"BWAreaConfig: {name} must be >= {INT_FIELDS[name]}, got {value}")
        elif name in FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"BWAreaConfig: {name} must be a number, got {value!r} ({type(value).__name__})")
            zero_ok = FLOAT_FIELDS[name]
            if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise ValueError(f"BWAreaConfig: {name} must be a finite number {'>=' if zero_ok else '>'} 0, "
                                 f"got {value!r}")


def check_dtype(name: str, value) -> None:
    """A weight dtype: a floating torch.dtype or its name (float32, bfloat16, float16, float64)."""
    import torch

    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"BWAreaConfig: {name} {value!r} is not a floating-point torch dtype "
                         "(float32, bfloat16, float16 or float64)")
