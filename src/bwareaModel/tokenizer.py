"""Released ``load_hf_tokenizer``: the checkpoint's tokenizer plus ``[PAD]``, as the released loader does."""

from bwarea.tokenizer import load_tokenizer


def load_hf_tokenizer(model_name_or_path, fast_tokenizer=True, add_special_tokens=None):
    # The released loader pads on the right; bwarea's generate handles left padding and says so if it sees
    # right padding, so keep the released side here for drop-in behaviour.
    tokenizer = load_tokenizer(model_name_or_path, padding_side="right", use_fast=fast_tokenizer)
    if add_special_tokens is not None:
        tokens = add_special_tokens if isinstance(add_special_tokens, list) else [add_special_tokens]
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer
