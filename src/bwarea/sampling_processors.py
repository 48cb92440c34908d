"""Token-logit adjustments for sampling, as transformers ``LogitsProcessor``s, one value per row.

``model.generate(..., logits_processor=LogitsProcessorList([...]))`` calls each as
``processor(input_ids (rows, cur_len), scores (rows, vocab)) -> scores`` before every token is chosen. Rows may
differ in their settings, so requests that ask for different penalties can still share a batch.

    FrequencyPresencePenalty(prompt_width, frequency=[0.5, 0.0], presence=[0.0, 1.0])
    LogitBias([{50256: -100.0}, {}], vocab_size)
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


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
