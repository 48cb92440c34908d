"""Scoring every action at once: fan-out, the world model per position, and BWArea's exact language-model view.

``fanout`` gives the next-token logits under every action; ``lm_logprobs`` the exact next-token
log-distribution of BWArea as a language model at every position (a logsumexp over the actions, what
``model(input_ids)`` returns) and ``lm_log_likelihood`` the same at the next tokens; ``world_logits_per_position``
the world model at every position under one given action there (the released ``model(input_ids)``). All run the
action-independent work once (``_understood``) and the world model's upper half, from the action layer on, per
action, each query attending to the shared context through a ``PrefixKVCache``. On CPU the products go through
oneDNN (``kernels.cpu_products``).
"""

from __future__ import annotations

import functools

import torch

from ..kernels import cpu_products
from .cache import make_caches, shared_context
from .controls import check_action_index


def _with_cpu_products(method):
    """Run ``method`` inside ``kernels.cpu_products`` for the model's device (oneDNN products on CPU)."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with cpu_products(self.world_model.lm_head.weight.device):
            return method(self, *args, **kwargs)
    return wrapped


class ScoringMixin:
    """``fanout``, ``world_logits_per_position``, ``lm_logprobs`` and ``lm_log_likelihood``."""

    def _understood(self, input_ids, attention_mask):
        """The action-independent work: the world model's lower half over the context, and its upper half
        under the inverse-dynamics actions with the upper blocks' keys/values kept.

        -> (lower hidden (batch, T, hidden), upper-block caches, cos, sin, bool validity (batch, T))
        """
        self._check_inputs(input_ids, attention_mask)
        batch, width = input_ids.shape
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None
        w = self.world_model
        cos, sin, mask = self.positions_and_mask(attention_mask, batch, width, input_ids.device, self._dtype())
        inverse = self.infer_actions(input_ids, attention_mask)[0]
        lower = w.run(w.embed_tokens(input_ids), cos, sin, mask, None, 0, w.action_layer)
        caches = make_caches(self, w, batch, width, range(w.action_layer, len(w.layers)))
        if w.action_layer < len(w.layers):
            # Only the upper blocks' keys/values are kept: the last block needs no attention or MLP.
            h = w.run(w.inject(lower, self.action_codebook(inverse)), cos, sin, mask, caches, w.action_layer,
                      len(w.layers) - 1)
            last = w.layers[-1]
            caches[-1].update(*last.self_attn.project(last.input_layernorm(h), cos, sin)[1:])
        valid = torch.ones(batch, width, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
            else attention_mask.bool()
        return lower, caches, cos, sin, valid

    def _upper_half_over_actions(self, x, kv, cos, sin, mask):
        """Queries x (rows, q, hidden), already carrying their actions, through the upper blocks; each attends to
        the shared context in ``kv`` (``_shared_context``) and to itself as ``mask`` (rows|1, 1, q, prefix + q)
        says. -> logits (rows, q, vocab) float32."""
        w = self.world_model
        h = w.norm(w.run(x, cos, sin, mask, kv, w.action_layer))
        return w.lm_head(h).float()

    @_with_cpu_products
    def fanout(self, input_ids, attention_mask=None):
        """Next-token logits under every action, for a context the inverse dynamics model understands.

        input_ids, attention_mask (batch, T), left-padded -> logits (batch, num_actions, vocab) float32: row a
        is ``model(input_ids, attention_mask, action_idx=[inverse actions 0..T-2, a]).logits[:, -1]``. The lower
        half and the context run once; only the last position's upper half runs per action, batched.
        """
        if attention_mask is not None and torch.is_tensor(input_ids) and attention_mask.shape == input_ids.shape \
                and not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("fanout reads the last position, which is padding in some row: pad on the left")
        lower, caches, cos, sin, valid = self._understood(input_ids, attention_mask)
        batch, width = input_ids.shape
        n = self.config.num_actions
        x = self.world_model.inject(lower[:, -1:].expand(batch, n, -1), self.action_codebook.embed.weight[None])
        # Each action's query sees the context before T-1 and its own key, not the other actions'.
        eye = torch.eye(n, dtype=torch.bool, device=input_ids.device).expand(batch, n, n)
        mask = torch.cat([valid[:, None, :width - 1].expand(batch, n, width - 1), eye], dim=2)[:, None]
        last_cos, last_sin = (t[:, :, -1:].expand(batch, 1, n, t.shape[-1]) for t in (cos, sin))
        return self._upper_half_over_actions(x, shared_context(caches, width - 1, 1), last_cos, last_sin, mask)

    def _world_at_each_position(self, lower, caches, cos, sin, valid, vectors, copies, memo=None, positions=None):
        """The world model at every position t under its own action, with the context before t understood.

        lower, caches, cos, sin, valid: ``_understood``'s; vectors (batch * copies, T or 1, codebook_dim): the
        action vector of each query, ``copies`` query rows per batch row (batch-major). -> logits
        (batch * copies, T, vocab) float32: row r at t is the world model's next-token logits after x_<=t, with
        the inverse-dynamics actions at s < t (the cached context) and vectors[r, t] at t. Nothing at t reads a
        token after t: the inverse-dynamics action at s explains token s+1 <= t. ``memo`` (a dict) keeps what
        calls with the same ``copies`` share (masks, rotary, the context's keys/values per query row).
        ``positions`` (k,) long: only those query positions, in that order (T becomes k above); each query
        attends to the same context as in the full pass, so its logits are the full pass's at its position.
        """
        shared = None if memo is None else memo.get(copies)
        if shared is None:
            batch, width = valid.shape
            device = valid.device
            where = torch.arange(width, device=device) if positions is None else positions
            queries = len(where)
            # Position t's query sees the valid context strictly before t, and its own key (its action at t).
            causal = where[:, None] > torch.arange(width, device=device)[None, :]
            eye = torch.eye(queries, dtype=torch.bool, device=device).expand(batch, queries, queries)
            mask = torch.cat([causal & valid[:, None, :], eye], dim=2)[:, None]
            # Unpadded rows share one mask; SDPA broadcasts it over the query rows.
            mask = mask[:1] if bool(valid.all()) else mask.repeat_interleave(copies, dim=0)
            if positions is not None:
                cos, sin = cos[:, :, positions], sin[:, :, positions]
            shared = (shared_context(caches, width, copies), cos.repeat_interleave(copies, dim=0),
                      sin.repeat_interleave(copies, dim=0), mask)
            if memo is not None:
                memo[copies] = shared
        if positions is not None:
            lower = lower[:, positions]
        x = self.world_model.inject(lower.repeat_interleave(copies, dim=0), vectors)
        return self._upper_half_over_actions(x, *shared)

    @_with_cpu_products
    def world_logits_per_position(self, input_ids, attention_mask=None, action_idx=None):
        """The world model at every position t under action_idx[:, t], the context before t understood.

        input_ids, attention_mask (batch, T), padded on either side; action_idx (batch, T) or an int -> logits
        (batch, T, vocab) float32, entry t = ``model(input_ids[:, :t+1], action_idx=[inverse-dynamics actions
        0..t-1, action_idx[:, t]]).logits[:, -1]``: leak-free at every position, in one pass. This is the
        seed-compatible view's machinery (``forward_under_policy``), and one term of ``lm_logprobs``' mixture.
        """
        if action_idx is None:
            raise ValueError("world_logits_per_position needs action_idx: an int or one action per position")
        understood = self._understood(input_ids, attention_mask)
        vectors = self.action_codebook(check_action_index(action_idx, input_ids, self.config.num_actions))
        return self._world_at_each_position(*understood, vectors, 1)

    @_with_cpu_products
    def _mixture(self, input_ids, attention_mask, actions_per_chunk, targets=None, positions=None):
        """The one implementation of BWArea's next-token mixture (``lm_logprobs``, ``lm_log_likelihood``, and
        ``forward`` without actions).

        -> (log p (batch, T, vocab) or, with ``targets`` (batch, T), log p at the targets (batch, T); the
        policy's log pi (batch, T, num_actions)). The actions stream through in chunks under a running
        logsumexp, so besides the result only one chunk's (batch, chunk, T, vocab) logits are alive. Gathering
        the targets before the sum over actions gives the same numbers and keeps the autograd graph small
        (behaviour cloning back-propagates into log pi through it). ``positions`` (k,) long: the mixture at
        those positions only (T becomes k in every result): the world model's upper half runs k queries per
        action instead of T.
        """
        if actions_per_chunk is not None and (isinstance(actions_per_chunk, bool) or not isinstance(
                actions_per_chunk, int) or actions_per_chunk < 1):
            raise ValueError(f"actions_per_chunk must be a positive int or None, got {actions_per_chunk!r}")
        lower, caches, cos, sin, valid = self._understood(input_ids, attention_mask)
        batch = input_ids.shape[0]
        n, vocab = self.config.num_actions, self.config.vocab_size
        log_pi = torch.log_softmax(self.policy_logits(input_ids, attention_mask), dim=-1)  # (batch, T, n)
        if positions is not None:
            log_pi = log_pi[:, positions]
            targets = None if targets is None else targets[:, positions]
        width = log_pi.shape[1]
        # Default: a chunk's logits hold about 4M floats (16 MB), or one action when the input alone is larger.
        # Bigger chunks are no faster on CPU (measured, benchmarks/bench_lm_view.py): they fall out of cache.
        chunk = actions_per_chunk or max(1, min(n, (4 << 20) // max(1, batch * width * vocab)))
        total, memo = None, {}
        for start in range(0, n, chunk):
            acts = torch.arange(start, min(n, start + chunk), device=input_ids.device)
            c = len(acts)
            # (batch * c, 1, dim), batch-major with the actions inner, as _world_at_each_position's rows are.
            vectors = self.action_codebook(acts).repeat(batch, 1)[:, None]
            logits = self._world_at_each_position(lower, caches, cos, sin, valid, vectors, c, memo, positions)
            logits = logits.view(batch, c, width, vocab)
            # log pi(a | x_<=t) - log Z_world(t, a): what turns each action's logits into its mixture term.
            weight = log_pi[:, :, start:start + c].transpose(1, 2)[..., None] - logits.logsumexp(-1, keepdim=True)
            if targets is not None:
                logits = logits.gather(-1, targets[:, None, :, None].expand(batch, c, width, 1))
            part = _logsumexp_over(logits.add_(weight) if not logits.requires_grad else logits + weight, dim=1)
            total = part if total is None else torch.logaddexp(total, part)
        return (total if targets is None else total.squeeze(-1)), log_pi

    def lm_logprobs(self, input_ids, attention_mask=None, actions_per_chunk=None):
        """BWArea as a language model: the exact next-token log-distribution at every position.

        input_ids, attention_mask (batch, T), padded on the left or the right -> (batch, T, vocab) float32, entry
        [b, t] = log p(. | x_<=t) = log sum_a pi(a | x_<=t) p_world(. | x_<=t, inverse-dynamics actions at
        s < t, a at t), normalised over the vocabulary (logsumexp 0). Leak-free (nothing at t reads a token
        after t), deterministic, and the same for a row whatever its batch neighbours or padding. Padded
        positions hold a valid distribution too (as if the pad token were text, seeing only the valid context
        before it), which callers mask. The action-independent work runs once; the world model's upper half runs
        per (position, action), ``actions_per_chunk`` actions at a time (default: about 16 MB of logits per
        chunk, at least one action), so the memory beyond the result is a few chunk buffers. Wrap in
        ``torch.no_grad()`` for evaluation.
        """
        return self._mixture(input_ids, attention_mask, actions_per_chunk)[0]

    def lm_log_likelihood(self, input_ids, attention_mask=None, actions_per_chunk=None, positions=None):
        """Exact log p(x_{t+1} | x_<=t) of BWArea as a language model: ``lm_logprobs`` at the next tokens.

        input_ids, attention_mask (batch, T), padded on the left or the right -> (batch, T-1) float32, entry t =
        logsumexp_a [log pi(a | x_<=t) + log p_world(x_{t+1} | x_<=t, inverse-dynamics actions before t, a)]
        = ``lm_logprobs(...)[:, t, x_{t+1}]``. Entries whose target or context token is padding are 0. Same
        computation as ``lm_logprobs``, with the targets picked before the sum over actions, so gradients into
        the policy stay cheap. Wrap in ``torch.no_grad()`` for evaluation.

        positions: a 1-D tensor (or list) of k distinct positions t in [0, T-1) -> (batch, k), entry j = the full
        result's entry positions[j], for about k/T of the world-model work (``bwarea bc --posterior-positions``
        trains on a random few per block).
        """
        if torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[1] > 0:
            targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).long()  # the last column is unused
        else:
            targets = None  # _understood names what is wrong with input_ids
        if positions is not None:
            self._check_inputs(input_ids, attention_mask)
            positions = _check_positions(positions, input_ids)
        ll = self._mixture(input_ids, attention_mask, actions_per_chunk, targets, positions)[0]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        scored = valid[:, 1:] & valid[:, :-1]
        if positions is None:
            return ll[:, :-1].masked_fill(~scored, 0.0)
        return ll.masked_fill(~scored[:, positions], 0.0)


def _check_positions(positions, input_ids) -> torch.Tensor:
    """``lm_log_likelihood``'s positions -> a 1-D long tensor on the input's device, or a ValueError naming the
    problem (each must be a position with a next token, and none twice)."""
    if not torch.is_tensor(positions):
        try:
            positions = torch.as_tensor(positions)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"positions must be a 1-D sequence of ints, got {positions!r}") from error
    if positions.dim() != 1 or positions.numel() == 0 or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        raise ValueError(f"positions must be a non-empty 1-D tensor of ints, got dtype {positions.dtype} and "
                         f"shape {tuple(positions.shape)}")
    last = input_ids.shape[1] - 2  # the last position has no next token to score
    if int(positions.min()) < 0 or int(positions.max()) > last:
        raise ValueError(f"positions must lie in [0, {last}] for inputs of length {input_ids.shape[1]} (the last "
                         f"position has no next token), got min {int(positions.min())}, max {int(positions.max())}")
    if len(torch.unique(positions)) != len(positions):
        raise ValueError("positions holds a position twice")
    return positions.to(device=input_ids.device, dtype=torch.long)


def _logsumexp_over(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp(x, dim); x is used as scratch space when it carries no gradient (one buffer, not two)."""
    if x.requires_grad:
        return torch.logsumexp(x, dim)
    top = x.amax(dim, keepdim=True)
    return x.sub_(top).exp_().sum(dim).log_().add_(top.squeeze(dim))
