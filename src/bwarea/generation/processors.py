"""Choosing each new token: a list of logit processors, then greedy or a sample.

Every processor follows transformers' ``LogitsProcessor`` convention, ``processor(input_ids (rows, cur_len),
scores (rows, vocab)) -> scores``, so a user's transformers processors join the list as they are. The list runs
in transformers' order: ``MinNewTokens``, ``RepetitionPenalty``, the caller's ``logits_processor``; then
``TokenSampler`` applies temperature, top-k and top-p and samples (or takes the argmax). A new sampling control
is one processor class here and one line in ``token_chooser``.

``FrequencyPresencePenalty`` and ``LogitBias`` are OpenAI's per-row controls, used by the server.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .controls import GREEDY_BELOW

# Beyond this range a repetition penalty over- or underflows float32 logits, and its effect is already total:
# it acts as the nearer bound.
PENALTY_RANGE = (1e-30, 1e30)


class MinNewTokens(LogitsProcessor):
    """Bars the EOS tokens until ``min_new_tokens`` tokens follow the (padded) prompt of ``prompt_width``."""

    def __init__(self, min_new_tokens: int, eos: list[int], prompt_width: int):
        self.min_new_tokens, self.eos, self.prompt_width = min_new_tokens, eos, prompt_width

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_width < self.min_new_tokens:
            scores[:, self.eos] = float("-inf")
        return scores


class RepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (CTRL): a seen token's logit is divided by ``penalty`` where positive,
    multiplied where negative. Seen: the prompt's real tokens (not its padding) and every generated token."""

    def __init__(self, penalty: float, prompt: torch.Tensor, attention_mask: torch.Tensor | None, vocab: int):
        self.penalty = min(max(float(penalty), PENALTY_RANGE[0]), PENALTY_RANGE[1])
        counts = torch.zeros(prompt.shape[0], vocab, dtype=torch.long, device=prompt.device)
        counts.scatter_add_(1, prompt, torch.ones_like(prompt) if attention_mask is None else attention_mask)
        self.seen, self.known = counts > 0, prompt.shape[1]

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.known:  # the tokens chosen since the last call
            self.seen.scatter_(1, input_ids[:, self.known:], True)
            self.known = input_ids.shape[1]
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(self.seen, penalised, scores)


class FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI's penalties on tokens already generated (the prompt does not count):

        logit[j] -= count[j] * frequency + (count[j] > 0) * presence

    prompt_width: the (padded) prompt length, so generated tokens are ``input_ids[:, prompt_width:]``;
    frequency, presence: one float per row (negative values encourage repeats, as OpenAI allows).
    """

    def __init__(self, prompt_width: int, frequency, presence):
        self.prompt_width = prompt_width
        self.frequency = torch.as_tensor(frequency, dtype=torch.float32)
        self.presence = torch.as_tensor(presence, dtype=torch.float32)
        if self.frequency.shape != self.presence.shape or self.frequency.dim() != 1:
            raise ValueError("frequency and presence need one value per row")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(1, generated, torch.ones(generated.shape, dtype=scores.dtype, device=scores.device))
        frequency, presence = (t.to(scores.device, scores.dtype)[:, None] for t in (self.frequency, self.presence))
        return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence


class LogitBias(LogitsProcessor):
    """Adds a fixed bias to chosen tokens' logits (OpenAI's ``logit_bias``; -100 bans a token, 100 forces it).

    biases: one {token id: bias} dict per row; vocab_size: the width of the scores.
    """

    def __init__(self, biases: list[dict[int, float]], vocab_size: int):
        self.bias = torch.zeros(len(biases), vocab_size)
        for row, bias in enumerate(biases):
            for token, value in bias.items():
                if not 0 <= token < vocab_size:
                    raise ValueError(f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})")
                self.bias[row, token] = value

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.bias.to(scores.device, scores.dtype)


class TokenSampler:
    """The last step: greedy, or temperature, top-k, top-p (transformers' order) and a sample."""

    def __init__(self, do_sample: bool, temperature: float, top_k, top_p: float, generator):
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        self.do_sample = do_sample and temperature >= GREEDY_BELOW
        self.temperature, self.top_k, self.top_p, self.generator = float(temperature), top_k or None, top_p, generator

    def __call__(self, scores):
        if not self.do_sample:
            return scores.argmax(-1)
        logits = scores / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            # Drop a token once the tokens before it already hold top_p of the mass (the first always stays).
            drop = (probs.cumsum(-1) - probs) > self.top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator).squeeze(1)


class TokenChooser:
    """processors, then the sampler: ``chooser(logits (rows, vocab) float32, input_ids (rows, cur_len))`` ->
    tokens (rows,). ``scores`` keeps the last step's processed logits (what stopping criteria see)."""

    def __init__(self, processors: list, sampler: TokenSampler, min_new_tokens: int = 0):
        self.processors, self.sampler, self.min_new_tokens = processors, sampler, min_new_tokens
        self.scores = None

    def __call__(self, logits, input_ids):
        for processor in self.processors:
            logits = processor(input_ids, logits)
        self.scores = logits
        return self.sampler(logits)


def token_chooser(settings: dict, min_new_tokens: int, eos: list[int], prompt, attention_mask, vocab: int,
                  user_processors, generator) -> TokenChooser:
    """generate's settings -> the TokenChooser, processors in transformers' order."""
    penalty = settings["repetition_penalty"]
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    sampler = TokenSampler(settings["do_sample"], settings["temperature"], settings["top_k"], settings["top_p"],
                           generator)
    processors = []
    if min_new_tokens and eos:
        processors.append(MinNewTokens(min_new_tokens, eos, prompt.shape[1]))
    if penalty != 1.0:
        processors.append(RepetitionPenalty(penalty, prompt, attention_mask, vocab))
    processors.extend(user_processors or ())
    return TokenChooser(processors, sampler, min_new_tokens if eos else 0)
