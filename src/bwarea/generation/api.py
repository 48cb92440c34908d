"""``generate``: transformers' call, turned into one set of settings, one ``ActionControls`` and one decode loop.

The arguments are read once here: transformers' keywords and ``GenerationConfig`` (``conventions``), the action
controls (``controls``), the token processors (``processors``) and what stops a row (``stopping``); then
``loop.decode`` runs the prefill and the decode steps on a backend (``backends``).
"""

from __future__ import annotations

import torch

from .backends import backend_for
from .backends.cpu import prepare
from .controls import ActionChooser, ActionControls
from .conventions import callable_list, generate_settings, new_token_counts, token_list
from .loop import Stopping, decode
from .processors import token_chooser
from .scoring import ScoringMixin
from .stopping import StopStrings


class BWAreaGenerationMixin(ScoringMixin):
    """``generate`` and the scoring views (``fanout``, ``lm_logprobs``, ...) for ``BWAreaForCausalLM``."""

    def generate(self, input_ids=None, attention_mask=None, *, max_new_tokens=None, max_length=None,
                 min_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None,
                 repetition_penalty=None, eos_token_id=None, pad_token_id=None, num_return_sequences=None,
                 streamer=None, stop_strings=None, tokenizer=None, return_dict_in_generate=None,
                 generation_config=None, logits_processor=None, stopping_criteria=None, prompt_actions="inverse",
                 actions=None, allowed_actions=None, action_greedy=None, action_temperature=None,
                 step_callback=None, generator=None, backend=None, **kwargs):
        """Generate new tokens after a LEFT-padded batch of prompts.

        input_ids (batch, T), attention_mask (batch, T) or None -> LongTensor (batch * num_return_sequences,
        T + N), or a ``BWAreaGenerateOutput`` with ``return_dict_in_generate=True``.

        Length, as in transformers: N = ``max_new_tokens`` (default 20), or ``max_length`` - T where
        ``max_length`` counts the (padded) prompt too; giving both is an error unless they agree.
        ``min_new_tokens`` (or ``min_length`` - T) bars EOS until that many tokens exist.

        Prompt actions: ``"inverse"`` (default) labels positions 0..T-2 with the inverse dynamics model;
        ``"policy"`` uses the policy there too (the released cached generate). The policy chooses the action at
        T-1 and at every new position; ``actions`` overrides it (an int for every new position, or a schedule
        (N,) / (batch, N) where -1 lets the policy choose), ``allowed_actions`` masks it (action ids, or a bool
        mask (num_actions,) / (batch, num_actions)), ``action_greedy`` / ``action_temperature`` override
        ``set_action_sampling``.

        Tokens, in transformers' order: ``min_new_tokens``, ``repetition_penalty``, then ``logits_processor``
        (a ``LogitsProcessorList``, called as ``(input_ids (rows, T + step), scores (rows, vocab)) -> scores``),
        then greedy, or with ``do_sample`` a sample after ``temperature``, ``top_k``, ``top_p``. A row stops at
        ``eos_token_id`` (config's by default), when its new text contains one of ``stop_strings`` (needs
        ``tokenizer``), or when ``stopping_criteria`` (a ``StoppingCriteriaList``, called after each step with
        the sequences so far (rows, T + step + 1) and that step's scores) says True for it (a single bool
        means every row); its later tokens are ``pad_token_id``.

        ``generation_config`` (a transformers ``GenerationConfig``) supplies any of these settings that no
        keyword gives; a field it sets that bwarea cannot honour (beams, ``no_repeat_ngram_size``, ...) is an
        error naming it, as is any other keyword. ``use_cache``, ``num_beams=1`` and ``output_*=False`` are
        accepted: they do not change what is generated here.

        ``backend`` names the decode backend (``"eager"``, ``"cpu"``, ``"static"``, ``"cuda"``, ``"cuda-compile"``;
        default: the device's own, see ``generation.backends``); every backend gives the eager backend's tokens up
        to float rounding.

        ``streamer.put`` gets the prompt, then each step's tokens (rows,); ``step_callback(step, tokens,
        actions)`` runs after every step and stops generation by returning True. Each step appends its
        (rows, 1) actions to ``get_action_info()``.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (batch, seq)")
        settings = generate_settings(
            dict(max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens,
                 do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 num_return_sequences=num_return_sequences, stop_strings=stop_strings,
                 return_dict_in_generate=return_dict_in_generate), generation_config, kwargs)
        processors = callable_list(logits_processor, "logits_processor", "LogitsProcessorList")
        criteria = callable_list(stopping_criteria, "stopping_criteria", "StoppingCriteriaList")
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, settings["bos_token_id"])
        batch, width = input_ids.shape
        steps, min_new_tokens = new_token_counts(settings, width)
        copies = settings["num_return_sequences"]
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"num_return_sequences must be an int >= 1, got {copies!r}")
        if prompt_actions not in ("inverse", "policy"):
            raise ValueError(f"prompt_actions must be 'inverse' or 'policy', got {prompt_actions!r}")
        if width + steps > self.config.max_position_embeddings:
            raise ValueError(f"prompt length {width} + max_new_tokens {steps} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        eos = token_list(getattr(self.config, "eos_token_id", None) if settings["eos_token_id"] is None
                         else settings["eos_token_id"], "eos_token_id")
        pad = settings["pad_token_id"]
        if pad is None:
            pad = getattr(self.config, "pad_token_id", None)
            pad = pad if pad is not None else (eos[0] if eos else 0)
        device = input_ids.device
        step_backend = backend_for(self, device, backend)
        controls = ActionControls.build(self.config.num_actions, batch, steps, device, actions, allowed_actions,
                                        action_greedy, action_temperature).repeated(copies)
        choose_action = ActionChooser(controls, self.action_greedy, self.action_temperature, generator)
        if copies > 1:
            input_ids = input_ids.repeat_interleave(copies, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(copies, dim=0)
        choose_token = token_chooser(settings, min_new_tokens, eos, input_ids, attention_mask,
                                     self.config.vocab_size, processors, generator)
        strings = None if settings["stop_strings"] is None else StopStrings(settings["stop_strings"], tokenizer)
        stopping = Stopping(eos, pad, strings, criteria)
        with torch.no_grad():
            return decode(self, input_ids, attention_mask, steps, step_backend, choose_action, choose_token,
                          stopping, streamer, step_callback, prompt_actions, settings["return_dict_in_generate"])

    def _prompt(self, input_ids, attention_mask, bos_token_id=None):
        """Validate a prompt batch; an empty prompt starts from BOS; an all-ones mask becomes None."""
        if torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
            bos = getattr(self.config, "bos_token_id", None) if bos_token_id is None else bos_token_id
            if bos is None:
                raise ValueError("input_ids is empty and the config has no bos_token_id to start from")
            input_ids = torch.full((input_ids.shape[0], 1), bos, dtype=torch.long,
                                   device=input_ids.device)
            attention_mask = None
        self._check_inputs(input_ids, attention_mask)
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has no rows")
        if attention_mask is None:
            return input_ids.long(), None
        valid = attention_mask.to(device=input_ids.device).bool()
        if not bool(valid.any(-1).all()):
            raise ValueError("attention_mask has a row with no tokens: every prompt needs at least one")
        if bool((valid[:, 1:] < valid[:, :-1]).any()):
            raise ValueError("attention_mask is not left-padded (a 0 follows a 1): generate needs padding on the "
                             "left; set tokenizer.padding_side = 'left'")
        return input_ids.long(), None if bool(valid.all()) else valid.long()

    def optimize_for_cpu_decoding(self):
        """Lay the decode matrices out for the CPU decode backend (``backends.cpu.prepare``); returns the model."""
        return prepare(self)
