"""When a row stops: EOS, stop strings in its new text, or a user's stopping criteria."""

from __future__ import annotations

import torch


class StopStrings:
    """Stops a row when its generated text (not the prompt) contains one of the strings."""

    def __init__(self, stop_strings, tokenizer):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= to read the generated text")
        if not stop_strings or any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError("stop_strings must be a non-empty string or a list of non-empty strings")
        self.strings, self.tokenizer = list(stop_strings), tokenizer
        # A stop string of c characters lies within its last few tokens; byte-level pieces can hold part of a
        # character, so look back generously.
        self.window = 4 * max(len(s) for s in self.strings) + 4

    def hits(self, new_tokens, alive) -> list[int]:
        """new_tokens (rows, steps so far) on CPU, alive: list of bools -> rows whose text now holds a string."""
        rows = []
        for r, live in enumerate(alive):
            if live:
                text = self.tokenizer.decode(new_tokens[r, -self.window:].tolist(), skip_special_tokens=False)
                if any(s in text for s in self.strings):
                    rows.append(r)
        return rows



def criteria_say_done(criteria, sequences, scores) -> torch.Tensor:
    """Each stopping criterion over sequences (rows, cur_len) -> bool (rows,), True where any says done; a
    criterion that returns a plain bool answers for every row."""
    rows = sequences.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=sequences.device)
    for criterion in criteria:
        said = torch.as_tensor(criterion(sequences, scores), device=sequences.device).bool()
        if said.dim() != 0 and tuple(said.shape) != (rows,):
            raise ValueError(f"stopping_criteria returned shape {tuple(said.shape)}; expected a bool or ({rows},), "
                             "one per row")
        done |= said
    return done
