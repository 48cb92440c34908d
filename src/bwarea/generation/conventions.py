"""transformers' ``generate`` conventions: which keywords and ``GenerationConfig`` fields bwarea honours, how
lengths count, and how callables are given. Everything here turns a call into plain settings or names what it
cannot honour."""

from __future__ import annotations

import torch

# transformers' generate keywords (and GenerationConfig fields) that are honoured at these values only: bwarea
# always decodes with a KV cache (use_cache changes speed, never tokens), runs one beam, returns no scores,
# attentions or hidden states and syncs no GPUs. Any other value, or any other keyword, is an error naming it.
_NO_OP_GENERATE_VALUES = {"use_cache": (True, False), "num_beams": (1,), "output_scores": (False,),
                          "output_logits": (False,), "output_attentions": (False,),
                          "output_hidden_states": (False,), "synced_gpus": (False,)}
# generate's own defaults, where neither a keyword nor generation_config sets a value.
_GENERATE_DEFAULTS = {"max_new_tokens": None, "max_length": None, "min_new_tokens": None, "min_length": None,
                      "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": 1.0,
                      "repetition_penalty": 1.0, "eos_token_id": None, "pad_token_id": None, "bos_token_id": None,
                      "num_return_sequences": 1, "stop_strings": None, "return_dict_in_generate": False}


def generate_settings(given: dict, generation_config, kwargs: dict) -> dict:
    """generate's settings: ``given`` keywords (None = not given) over ``kwargs`` (other transformers keywords)
    over ``generation_config``'s set fields over ``_GENERATE_DEFAULTS``.

    Raises TypeError naming every keyword or set field that generate cannot honour."""
    fields = {}
    if generation_config is not None:
        from transformers import GenerationConfig
        if not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers GenerationConfig, got "
                            f"{type(generation_config).__name__}")
        fields = {k: v for k, v in generation_config.to_dict().items()
                  if v is not None and not k.startswith("_") and k != "transformers_version"}
    settings = dict(_GENERATE_DEFAULTS)
    cannot = []
    for source, values in (("generation_config.", fields), ("", kwargs)):
        for name, value in values.items():
            if value is None:  # not given
                continue
            if name in _GENERATE_DEFAULTS:
                settings[name] = value
            elif name not in _NO_OP_GENERATE_VALUES:
                cannot.append(f"{source}{name}")
            elif not any(value is ok or (type(value) is type(ok) and value == ok)
                         for ok in _NO_OP_GENERATE_VALUES[name]):
                cannot.append(f"{source}{name}={value!r}")
    if cannot:
        raise TypeError(f"generate cannot honour {', '.join(cannot)} (bwarea runs one sampled or greedy beam "
                        "and returns sequences, or with return_dict_in_generate also actions)")
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def new_token_counts(settings: dict, width: int) -> tuple[int, int]:
    """-> (max_new_tokens, min_new_tokens) for a prompt of ``width`` columns, from the length settings
    (max_length and min_length count the prompt, as in transformers)."""
    for name in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
        value = settings[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    max_new, max_length = settings["max_new_tokens"], settings["max_length"]
    if max_length is not None:
        if max_length < width:
            raise ValueError(f"max_length={max_length} counts the prompt, which already has {width} tokens: "
                             "give a larger max_length, or max_new_tokens")
        if max_new is not None and max_new != max_length - width:
            raise ValueError(f"max_new_tokens={max_new} and max_length={max_length} disagree for a prompt of "
                             f"{width} tokens (max_length counts the prompt): give one of them")
        max_new = max_length - width
    max_new = 20 if max_new is None else max_new
    min_new = settings["min_new_tokens"] or 0
    if settings["min_length"] is not None:
        min_new = max(min_new, settings["min_length"] - width)
    if min_new > max_new:
        name = "min_new_tokens" if settings["min_length"] is None else "min_new_tokens / min_length"
        raise ValueError(f"{name} asks for {min_new} new tokens, more than max_new_tokens={max_new}")
    return max_new, min_new


def callable_list(value, name: str, kind: str):
    """A ``LogitsProcessorList`` / ``StoppingCriteriaList`` (or a plain list of callables, or one callable)
    -> a callable over the whole list, or None when empty."""
    if value is None:
        return None
    from transformers import LogitsProcessorList, StoppingCriteriaList
    cls = LogitsProcessorList if kind == "LogitsProcessorList" else StoppingCriteriaList
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = [type(item).__name__ for item in items if not callable(item)]
    if bad:
        raise TypeError(f"{name} must be a {kind} of callables, got {type(value).__name__} holding {bad}")
    return cls(items) if items else None


def token_list(value, name) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value.tolist() if torch.is_tensor(value) else value)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return values
