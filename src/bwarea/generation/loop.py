"""The generation loop: prefill, then one decode step per new token, with stopping and streaming bookkeeping.

BWArea as a language model (paper, seed README):

* the inverse dynamics model *understands* the prompt: prompt positions 0..T-2 get its actions;
* the policy chooses the action at the last prompt position and at every generated position;
* the world model writes each next token from its (token, action) history.

``decode`` runs that with one prefill (inverse dynamics, policy and world model over the prompt, through the
model's own blocks into the decode backend's caches) and then, per new token, the backend's two half-steps
around the action choice (``backends``). The inverse dynamics never runs while decoding.
``prompt_actions="policy"`` gives the released cached generate instead (policy actions at every prompt
position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ..kernels import cpu_products
from .stopping import criteria_say_done


@dataclass
class BWAreaGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``. N = max_new_tokens, rows = batch * num_return_sequences.

    sequences: (rows, T + N) prompt then new tokens; pad_token_id after EOS or a stop string.
    actions: (rows, N) long, the action that produced each new token (0 where ``new_token_mask`` is False
      because generation had stopped for every row).
    action_logprobs: (rows, N) log softmax of the policy's logits (temperature 1, no action mask) at that action.
    action_entropy: (rows, N) entropy of the same policy distribution.
    new_token_mask: (rows, N) bool, True for generated tokens up to and including EOS / the stop string.
    prompt_actions: (rows, T - 1) the actions at prompt positions 0..T-2 (inverse dynamics or policy).
    prompt_length: T, the (padded) prompt width.
    """

    sequences: torch.Tensor | None = None
    actions: torch.Tensor | None = None
    action_logprobs: torch.Tensor | None = None
    action_entropy: torch.Tensor | None = None
    new_token_mask: torch.Tensor | None = None
    prompt_actions: torch.Tensor | None = None
    prompt_length: int | None = None


@dataclass
class Stopping:
    """What ends a row: EOS ids, stop strings (``StopStrings``), stopping criteria; the pad id after it."""

    eos: list[int]
    pad: int
    strings: object = None
    criteria: object = None


def decode(model, input_ids, attention_mask, steps, backend, choose_action, choose_token, stopping: Stopping,
           streamer=None, step_callback=None, prompt_actions="inverse", return_dict=False):
    """Generate ``steps`` tokens after a left-padded prompt batch (rows, T) -> token ids, or the output object.

    backend: a DecodeStep class; choose_action: an ``ActionChooser``; choose_token: a ``TokenChooser``."""
    rows, width = input_ids.shape
    device, pad = input_ids.device, stopping.pad
    sequences = torch.full((rows, width + steps), pad, dtype=torch.long, device=device)
    sequences[:, :width] = input_ids
    out_actions = torch.zeros(rows, steps, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, steps, device=device)
    entropy = torch.zeros(rows, steps, device=device)
    new_mask = torch.zeros(rows, steps, dtype=torch.bool, device=device)

    def finish(prompt_acts):
        if streamer is not None:
            streamer.end()
        if not return_dict:
            return sequences
        return BWAreaGenerateOutput(sequences=sequences, actions=out_actions, action_logprobs=logprobs,
                                    action_entropy=entropy, new_token_mask=new_mask, prompt_actions=prompt_acts,
                                    prompt_length=width)

    if streamer is not None:
        streamer.put(input_ids.cpu())
    if steps == 0:
        with cpu_products(device):
            prompt_acts = (model.infer_actions(input_ids, attention_mask)[0] if prompt_actions == "inverse"
                           else choose_action.sample(model.policy_logits(input_ids, attention_mask)))[:, :-1]
        return finish(prompt_acts)

    run_policy = choose_action.needs_policy or return_dict or prompt_actions == "policy"
    step = backend(model, rows, width, steps, attention_mask, run_policy)
    dtype = model.world_model.embed_tokens.weight.dtype
    cos, sin, mask = model.positions_and_mask(attention_mask, rows, width, device, dtype)

    # Prefill: actions for the prompt, the policy's choice at T-1, the world model over the prompt.
    with cpu_products(device):
        policy_logits = model.policy(input_ids, cos, sin, mask, step.policy_caches) if run_policy else None
        if prompt_actions == "inverse":
            prompt_acts = model.infer_actions(input_ids, attention_mask)[0][:, :-1]
        else:
            prompt_acts = choose_action.sample(policy_logits[:, :-1])
        last = None if policy_logits is None else policy_logits[:, -1]
        action = choose_action(last, 0)
        vectors = model.action_codebook(torch.cat([prompt_acts, action[:, None]], dim=1))
        hidden = model.world_model(input_ids, vectors, cos, sin, mask, step.world_caches)
        logits = model.world_model.lm_head(hidden[:, -1]).float()

    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    eos_ids = torch.tensor(stopping.eos, device=device) if stopping.eos else None
    stoppable = eos_ids is not None or stopping.strings is not None or stopping.criteria is not None
    # EOS is barred before min_new_tokens: without stop strings or stopping criteria no row can finish there, so
    # those steps skip the per-step checks (a few ops and a device sync each).
    checks_from = 0 if stopping.strings is not None or stopping.criteria is not None else \
        choose_token.min_new_tokens
    info = model.action_info["action_idx"]
    done_steps = steps
    for t in range(steps):
        if t > 0:
            policy_logits, hidden = step.lower(sequences[:, width + t - 1], t - 1, run_policy)
            action = choose_action(policy_logits, t)
            logits = step.upper(hidden, action, t - 1)
        else:
            policy_logits = last
        token = choose_token(logits, sequences[:, :width + t])
        check = stoppable and t >= checks_from
        if check:
            token = token.masked_fill(finished, pad)
            new_mask[:, t] = ~finished
        else:
            new_mask[:, t] = True
        sequences[:, width + t] = token
        out_actions[:, t] = action
        info.append(action[:, None])
        if return_dict:
            logp = torch.log_softmax(policy_logits, dim=-1)
            logprobs[:, t] = logp.gather(1, action[:, None]).squeeze(1)
            entropy[:, t] = -(logp.exp() * logp).sum(-1)
        if streamer is not None:
            streamer.put(token.cpu())
        stop = step_callback is not None and bool(step_callback(t, token, action))
        if check:
            if eos_ids is not None:
                finished |= torch.isin(token, eos_ids)
            if stopping.strings is not None:
                hit = stopping.strings.hits(sequences[:, width:width + t + 1].cpu(), (~finished).tolist())
                finished[hit] = True
            if stopping.criteria is not None:
                finished |= criteria_say_done(stopping.criteria, sequences[:, :width + t + 1], choose_token.scores)
            stop = stop or bool(finished.all())
        if stop:
            done_steps = t + 1
            break
    # Rows past a stop hold padding; the action record keeps one (rows, 1) entry per new column.
    for _ in range(done_steps, steps):
        info.append(torch.zeros(rows, 1, dtype=torch.long, device=device))
    return finish(prompt_acts)
