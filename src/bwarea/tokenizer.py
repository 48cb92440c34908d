"""Tokenizer loading: transformers' tokenizer from a checkpoint folder, with a pad token."""

from __future__ import annotations

from transformers import AutoTokenizer


def load_tokenizer(path, padding_side: str = "left", **kwargs):
    """Load the tokenizer stored with a BWArea checkpoint.

    A tokenizer without a pad token gets ``[PAD]``, as the released BWArea loader does (the released models
    were trained with it as the token after the original vocabulary). Left padding is the default so that a
    batch of prompts can be generated from together; it is given at load time so that ``save_pretrained`` keeps
    it in tokenizer_config.json (plain ``AutoTokenizer.from_pretrained`` then pads on the left too).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side=padding_side, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.padding_side = padding_side
    return tokenizer
