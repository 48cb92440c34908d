"""Action controls, validated in one place: for ``model(action_idx=)``, ``generate``, the server and the CLI.

BWArea's world model writes each token under one of ``num_actions`` latent actions. A caller can steer it:

* ``actions``: fix the action at new positions: an int (every position), or a schedule with one entry per new
  token where -1 lets the policy choose ((steps,) for every row or (batch, steps));
* ``allowed_actions``: the actions the policy may choose from (action ids, or a bool mask (num_actions,) /
  (batch, num_actions));
* ``action_greedy`` / ``action_temperature``: how the policy's choice is made.

``ActionControls.build`` turns any of these spellings into tensors, or raises a ValueError naming the bad value;
``check_request`` validates the plain-Python form a server request or a CLI flag carries, before any tensor
exists; ``check_action_index`` validates ``forward``'s ``action_idx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this temperature a sample is the argmax up to float rounding, and logits / temperature can overflow
# float32: tokens and actions are chosen greedily (the limit).
GREEDY_BELOW = 1e-5


def _is_action(value, n: int, extra=()) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and (0 <= value < n or value in extra)


def check_request(num_actions: int, actions=None, allowed=None, max_new_tokens: int | None = None) -> None:
    """Validate a request's action controls in plain Python (lists and ints); ValueError naming the bad value.

    actions: None (the policy chooses), an int for every new token, or a list schedule (-1 = the policy
    chooses; shorter than max_new_tokens means the policy chooses after it). allowed: None or a non-empty list of
    the actions the policy may use; actions fixed by ``actions`` must be among them.
    """
    if isinstance(actions, list):
        bad = [a for a in actions if not _is_action(a, num_actions, (-1,))]
        if bad:
            raise ValueError(f"action schedule entry {bad[0]!r} is outside [0, {num_actions}) (or -1 for the policy)")
        if max_new_tokens is not None and len(actions) > max_new_tokens:
            raise ValueError(f"the action schedule has {len(actions)} entries but at most {max_new_tokens} tokens "
                             "are generated")
    elif actions is not None and not _is_action(actions, num_actions):
        raise ValueError(f"action {actions!r} is outside [0, {num_actions})")
    if allowed is not None:
        if not allowed:
            raise ValueError("allowed_actions is empty: allow at least one action")
        bad = [a for a in allowed if not _is_action(a, num_actions)]
        if bad:
            raise ValueError(f"allowed action {bad[0]!r} is outside [0, {num_actions})")
        fixed = [actions] if isinstance(actions, int) else [a for a in actions or [] if a >= 0]
        outside = [a for a in fixed if a not in allowed]
        if outside:
            raise ValueError(f"action {outside[0]} is fixed by actions but is not among the allowed actions")


def check_action_index(action_idx, input_ids: torch.Tensor, num_actions: int) -> torch.Tensor:
    """``forward``'s action_idx: an int or a (batch, seq) tensor -> (batch, seq) long tensor, validated."""
    n = num_actions
    if isinstance(action_idx, bool) or not isinstance(action_idx, (int, torch.Tensor)):
        raise ValueError(f"action_idx must be an int or a (batch, seq) LongTensor, got {type(action_idx).__name__}")
    if isinstance(action_idx, int) or action_idx.dim() == 0:
        a = int(action_idx)
        if not 0 <= a < n:
            raise ValueError(f"action index {a} is outside [0, {n})")
        return torch.full_like(input_ids, a, dtype=torch.long)
    if action_idx.dtype.is_floating_point or action_idx.dtype == torch.bool:
        raise ValueError(f"action_idx must hold integer action indices, got dtype {action_idx.dtype}")
    if tuple(action_idx.shape) != tuple(input_ids.shape):
        raise ValueError(f"action_idx has shape {tuple(action_idx.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}: give one action per position")
    low, high = int(action_idx.min()), int(action_idx.max())
    if low < 0 or high >= n:
        raise ValueError(f"action index {low if low < 0 else high} is outside [0, {n})")
    return action_idx.to(device=input_ids.device, dtype=torch.long)


@dataclass
class ActionControls:
    """A generation's action controls as tensors: schedule (batch, steps) long with -1 = policy, or None;
    allowed (1 or batch, num_actions) bool, or None; greedy / temperature (None = the model's setting)."""

    schedule: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    greedy: bool | None = None
    temperature: float | None = None

    @classmethod
    def build(cls, num_actions: int, batch: int, steps: int, device, actions=None, allowed_actions=None,
              action_greedy=None, action_temperature=None, short_schedule: bool = False) -> "ActionControls":
        """Any accepted spelling -> ActionControls, or ValueError naming the bad value. A schedule must have
        ``steps`` entries, or fewer with ``short_schedule`` (the policy chooses after it, as the server allows)."""
        schedule = _schedule(actions, num_actions, steps, batch, device, short_schedule)
        allowed = _allowed(allowed_actions, num_actions, batch, device)
        if schedule is not None and allowed is not None:
            fixed = schedule >= 0
            bad = fixed & ~allowed.expand(batch, num_actions).gather(1, schedule.clamp(min=0))
            if bool(bad.any()):
                row, step = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"actions fixes action {int(schedule[row, step])} at step {step} (row {row}) "
                                 "but allowed_actions forbids it")
        if action_temperature is not None and (isinstance(action_temperature, bool)
                                               or not isinstance(action_temperature, (int, float))):
            raise ValueError(f"action_temperature must be a number, got {action_temperature!r}")
        return cls(schedule, allowed, None if action_greedy is None else bool(action_greedy),
                   None if action_temperature is None else float(action_temperature))

    @classmethod
    def per_row(cls, num_actions: int, steps: int, device, actions: list, allowed: list) -> "ActionControls":
        """Each row's plain-Python controls, already passed by ``check_request`` when its request came in, laid
        out as one batch's tensors; ``generate`` checks them again as tensors (``build``)."""
        schedule = None
        if any(a is not None for a in actions):
            schedule = torch.full((len(actions), steps), -1, dtype=torch.long)
            for b, a in enumerate(actions):
                if isinstance(a, int):
                    schedule[b] = a
                elif a:
                    schedule[b, :len(a)] = torch.tensor(a)
        mask = None
        if any(ok is not None for ok in allowed):
            mask = torch.ones((len(allowed), num_actions), dtype=torch.bool)
            for b, ok in enumerate(allowed):
                if ok is not None:
                    mask[b] = False
                    mask[b, ok] = True
        return cls(None if schedule is None else schedule.to(device), None if mask is None else mask.to(device))

    def repeated(self, copies: int) -> "ActionControls":
        """The controls for ``copies`` consecutive rows per batch row (num_return_sequences)."""
        if copies == 1:
            return self
        rep = (lambda t: None if t is None else t if t.shape[0] == 1 else t.repeat_interleave(copies, dim=0))
        return ActionControls(rep(self.schedule), rep(self.allowed), self.greedy, self.temperature)


def _schedule(actions, n, steps, batch, device, short):
    """int / (steps,) / (batch, steps) with -1 = policy -> (batch, steps) long, or None."""
    if actions is None:
        return None
    if isinstance(actions, bool):
        raise ValueError("actions must be an int, a list or a tensor of action indices, not a bool")
    if isinstance(actions, int):
        if not 0 <= actions < n:
            raise ValueError(f"actions={actions} is outside [0, {n})")
        return torch.full((batch, steps), actions, dtype=torch.long, device=device)
    schedule = torch.as_tensor(actions, device=device)
    if schedule.dtype.is_floating_point or schedule.dtype == torch.bool:
        raise ValueError(f"actions must hold integer action indices, got dtype {schedule.dtype}")
    schedule = schedule.long()
    if schedule.dim() == 1:
        schedule = schedule.expand(batch, -1)
    given = schedule.shape[-1] if schedule.dim() == 2 else None
    if schedule.dim() != 2 or schedule.shape[0] != batch or not (given == steps or (short and given < steps)):
        raise ValueError(f"actions schedule has shape {tuple(torch.as_tensor(actions).shape)}; give "
                         f"max_new_tokens={steps} entries, as ({steps},) or (batch={batch}, {steps})")
    if given and (int(schedule.min()) < -1 or int(schedule.max()) >= n):
        bad = int(schedule.min()) if int(schedule.min()) < -1 else int(schedule.max())
        raise ValueError(f"actions schedule holds {bad}: entries must be -1 (policy) or in [0, {n})")
    if given < steps:
        schedule = torch.cat([schedule, schedule.new_full((batch, steps - given), -1)], dim=1)
    return schedule


def _allowed(allowed, n, batch, device):
    """list of ints / bool (n,) / bool (batch, n) -> bool (1 or batch, n), or None."""
    if allowed is None:
        return None
    mask = torch.as_tensor(allowed, device=device)
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dim() != 1:
            raise ValueError("allowed_actions must be a list of action indices or a bool mask (num_actions,) "
                             "or (batch, num_actions)")
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= n):
            raise ValueError(f"allowed_actions holds an action outside [0, {n})")
        ids = mask.long()
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[ids] = True
    if mask.shape[-1] != n or mask.dim() > 2 or (mask.dim() == 2 and mask.shape[0] != batch):
        raise ValueError(f"allowed_actions mask has shape {tuple(mask.shape)}; expected ({n},) or ({batch}, {n})")
    mask = mask.view(-1, n)
    if not bool(mask.any(-1).all()):
        raise ValueError("allowed_actions allows no action (for at least one row): allow at least one")
    return mask


class ActionChooser:
    """The action at each new position: the schedule where it fixes one, else the policy (masked, greedy or
    sampled at a temperature)."""

    def __init__(self, controls: ActionControls, model_greedy: bool, model_temperature: float, generator):
        self.greedy = model_greedy if controls.greedy is None else controls.greedy
        self.temperature = model_temperature if controls.temperature is None else controls.temperature
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"action_temperature must be > 0 when sampling actions, got {self.temperature}")
        self.greedy = self.greedy or self.temperature < GREEDY_BELOW
        self.generator = generator
        self.schedule, self.allowed = controls.schedule, controls.allowed
        # Per step: does the schedule fix every row / no row? (Python lists: no device sync while decoding.)
        if self.schedule is None:
            self.all_fixed = self.none_fixed = None
        else:
            fixed = (self.schedule >= 0).cpu()
            self.all_fixed, self.none_fixed = fixed.all(0).tolist(), (~fixed).all(0).tolist()

    @property
    def needs_policy(self) -> bool:
        return self.all_fixed is None or not all(self.all_fixed)

    def sample(self, logits):
        """logits (..., num_actions) -> (...) argmax, or a sample at the action temperature (no mask, no schedule)."""
        if self.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]) / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).view(logits.shape[:-1])

    def __call__(self, logits, step):
        """logits (rows, num_actions) or None (when the schedule fixes every row) -> actions (rows,)."""
        if self.all_fixed is not None and self.all_fixed[step]:
            return self.schedule[:, step]
        chosen = self.sample(logits if self.allowed is None else logits.masked_fill(~self.allowed, float("-inf")))
        if self.all_fixed is not None and not self.none_fixed[step]:
            fixed = self.schedule[:, step]
            chosen = torch.where(fixed >= 0, fixed, chosen)
        return chosen
