"""What people see of a model: prompt tokens, their actions, fan-out tables and streamed text.

Shared by the CLI verbs and the server (it lives outside ``serve/`` so the CLI never imports the server), so
both show the same numbers. Every function here takes a model and
tokenizer that are already loaded and runs under ``torch.inference_mode``.

Convention: the action *of a token* is the action that produced it. The inverse dynamics labels position t with
the action that explains token t+1, so token i (i >= 1) carries ``action_index[i - 1]``; the first token (BOS)
has none. Generated tokens carry the action the policy (or the caller) chose for them, the same convention.
"""

from __future__ import annotations

import math

import torch


def encode_prompt(tokenizer, text: str, limit: int, why: str = "") -> list[int]:
    """Text -> token ids (with the tokenizer's BOS); ValueError if the text is empty of tokens or above ``limit``
    tokens (``why`` says where the limit comes from, in that message)."""
    if not isinstance(text, str):
        raise ValueError(f"the prompt must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON can carry lone surrogates ("\udfff"); no tokenizer can read them
        raise ValueError(f"the prompt is not valid Unicode text: {err.reason} at character {err.start}") from None
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer adds no BOS token: give some text")
    if len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens long; the limit is {limit}{why}")
    return list(ids)


def check_token_ids(ids, vocab_size: int, limit: int, why: str = "") -> list[int]:
    """A prompt given as token ids: a non-empty list of ints in [0, vocab_size), at most ``limit`` long."""
    if not ids:
        raise ValueError("the prompt is an empty list of token ids")
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")
    if len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens long; the limit is {limit}{why}")
    return list(ids)


class TextStream:
    """Turns token ids, one at a time, into the text each adds, cutting at stop strings.

    Decoding a token alone loses context (leading spaces, multi-byte characters split across byte tokens), so
    each step decodes a short window of recent tokens and emits only what the new token added; text that ends in
    an incomplete character waits for the next token (the scheme text-generation-inference uses). Text that could
    be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer, context_ids=(), stop: list[str] | tuple = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix = max(0, len(self.ids) - 4)  # a few context tokens so the first piece keeps its spacing
        self.read = len(self.ids)
        self.stop = [s for s in stop if s]
        self.text = ""        # everything the generated tokens decode to (cut at a stop string)
        self.sent = 0         # how much of self.text has been handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """The text ``token_id`` adds after the tokens so far ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def push(self, token_id: int) -> tuple[str, str]:
        """Add one token -> (its piece, the text now safe to show). After a stop string nothing more is shown."""
        if self.stopped:
            return "", ""
        piece = self.piece(token_id)
        self.text += piece
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [p for p in (self.text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                return piece, self.flush()
        safe = len(self.text) - self._held_back()
        shown = self.text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return piece, shown

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """The text not shown yet (held back for a possible stop string); call when the sequence ends."""
        rest, self.sent = self.text[self.sent:], len(self.text)
        return rest


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Token ids -> the text each adds in context; "".join(pieces) is the decoded text (specials skipped)."""
    stream = TextStream(tokenizer)
    return [stream.piece(i) for i in ids]


def token_label(tokenizer, token_id: int) -> str:
    """The vocabulary entry of a token (e.g. '▁the', '</s>'), for tables where the decoded text is empty."""
    if token_id >= len(tokenizer):
        return f"<unused {token_id}>"
    return tokenizer.convert_ids_to_tokens(int(token_id))


@torch.inference_mode()
def label_actions(model, tokenizer, ids: list[int]) -> list[dict]:
    """Inverse-dynamics actions of a prompt.

    ids: token ids (T,) -> T dicts {position, id, token, text, action}; ``action`` is the action that produced the
    token (None for the first token, which nothing produced).
    """
    index, _, _ = model.infer_actions(torch.tensor([ids], device=model.device))
    actions = [None] + index[0, :-1].tolist()
    pieces = token_pieces(tokenizer, ids)
    return [{"position": i, "id": t, "token": token_label(tokenizer, t), "text": pieces[i], "action": actions[i]}
            for i, t in enumerate(ids)]


@torch.inference_mode()
def fanout_table(model, tokenizer, ids: list[int], top_k: int = 5, actions: list[int] | None = None) -> dict:
    """The next token under each action, for a prompt understood by the inverse dynamics.

    ids: token ids (T,); top_k: tokens listed per action; actions: which actions to list (default all).
    -> {"policy": [p(a | prompt) for every action], "actions": [{"action", "policy_prob",
    "top": [{"id", "token", "text", "prob", "logprob"}]}]} with ``text`` what the token adds after the prompt.
    Token ids the tokenizer cannot write (padding slots of the vocabulary) are never listed.
    """
    num_actions = model.config.num_actions
    actions = list(range(num_actions)) if actions is None else actions
    if not actions:
        raise ValueError("actions is empty: list at least one action, or leave it out for all of them")
    bad = [a for a in actions if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < num_actions]
    if bad:
        raise ValueError(f"action {bad[0]!r} is outside [0, {num_actions})")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    input_ids = torch.tensor([ids], device=model.device)
    logprobs = torch.log_softmax(model.fanout(input_ids)[0].float(), dim=-1)       # (A, V)
    policy = torch.softmax(model.policy_logits(input_ids)[0, -1].float(), dim=-1)  # (A,)
    writable = _writable_mask(tokenizer, logprobs.shape[-1], logprobs.device)
    ranked = logprobs.masked_fill(~writable, float("-inf"))[actions].topk(min(top_k, int(writable.sum())), dim=-1)
    texts = {}  # a token's text after this prompt is the same under every action
    rows = []
    for row, a in enumerate(actions):
        top = []
        for lp, t in zip(ranked.values[row].tolist(), ranked.indices[row].tolist()):
            if t not in texts:
                texts[t] = TextStream(tokenizer, ids).piece(t)
            top.append({"id": t, "token": token_label(tokenizer, t), "text": texts[t],
                        "prob": math.exp(lp), "logprob": lp})
        rows.append({"action": a, "policy_prob": float(policy[a]), "top": top})
    return {"policy": policy.tolist(), "actions": rows}


def _writable_mask(tokenizer, vocab_size: int, device) -> torch.Tensor:
    """(V,) bool: True for ids the tokenizer has, except padding (which no text contains)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[:min(len(tokenizer), vocab_size)] = True
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id < vocab_size:
        mask[tokenizer.pad_token_id] = False
    return mask
