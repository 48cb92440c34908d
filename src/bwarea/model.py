"""The BWArea model: one file, read top to bottom.

    RMSNorm -> rotary -> attention -> MLP -> Block -> Trunk
    -> WorldModel, InverseDynamics, Policy, ActionCodebook -> BWAreaForCausalLM

A BWArea model is three Llama-style transformers that share a discrete action space of
``num_actions`` codebook rows:

* the **world model** writes token t+1 from tokens <= t and the action a_t, which enters once, before
  block ``action_layer``:  h <- h + RMSNorm_dyn(W_dyn [h ; U e_a]);
* the **inverse dynamics** model infers a_t from tokens <= t+1 (its output at t+1, pressed to the codebook
  width, snapped to the nearest codebook row);
* the **policy** predicts a_t from tokens <= t (logits over the actions).

Generation (``generate``, ``fanout``) and the exact language-model scores (``lm_logprobs``,
``lm_log_likelihood``) live in the ``generation`` package; this file is the forward pass and the released BWArea call
surface (``forward_inverse``, ``forward_policy``, action info). The views:

* ``model(input_ids)``: BWArea as a language model, the mixture over the policy's actions (``lm_logprobs``);
* ``model(input_ids, action_idx=)``: the world model under the given actions;
* ``forward_inverse``: the world model under the inverse-dynamics actions, which saw the next token (training);
* ``forward_under_policy``: the world model under the policy's action at each position (the released call);
* ``forward_policy``: the policy's action logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from . import checkpoint
from .config import BWAreaConfig
from .generation import BWAreaGenerationMixin
from .generation.controls import check_action_index


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as Llama does, so bf16 matches.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position tables, computed for the positions asked for (no buffers: meta-device loading safe)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (batch, seq) -> cos, sin (batch, 1, seq, head_dim) in ``dtype``."""
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim)
        freqs = positions.float()[..., None] * inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query causal self-attention with one fused q/k/v projection."""

    def __init__(self, config: BWAreaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                               bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        """x (batch, seq, hidden); mask None (plain causal) or bool (batch|1, 1, seq, keys), True = attend.

        ``kv_cache`` is any object with ``update(k, v) -> (k_all, v_all)``; with a cache the caller gives
        the mask unless it is decoding one unpadded position.
        """
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        # SDPA's is_causal aligns top-left, so it is only right when queries and keys are the same positions.
        causal = mask is None and t > 1
        if causal and k.shape[2] != t:
            raise ValueError("attention over a cache with several new positions needs an explicit mask")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def project(self, x, cos, sin):
        """x (batch, seq, hidden) -> rotated queries (batch, heads, seq, head_dim), rotated keys and values
        (batch, kv_heads, seq, head_dim)."""
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1)
        q = apply_rotary(q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        return q, k, v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU feed-forward with the gate and up projections fused into one matrix."""

    def __init__(self, config: BWAreaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """A Llama decoder layer: pre-norm attention and pre-norm SwiGLU, each with a residual."""

    def __init__(self, config: BWAreaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Token embedding, ``num_layers`` blocks and a final norm: the body each of the three parts has."""

    def __init__(self, config: BWAreaConfig, num_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run(self, h, cos, sin, mask=None, kv_caches=None, start=0, stop=None):
        """Run blocks [start, stop) over h (batch, seq, hidden); kv_caches is indexed by block number."""
        for i in range(start, len(self.layers) if stop is None else stop):
            h = self.layers[i](h, cos, sin, mask, None if kv_caches is None else kv_caches[i])
        return h


class WorldModel(Trunk):
    """Writes the next token from (token, action) history. The action enters before block ``action_layer``."""

    def __init__(self, config: BWAreaConfig):
        super().__init__(config, config.num_hidden_layers)
        self.action_layer = config.action_layer
        self.action_proj = nn.Linear(config.codebook_dim, config.hidden_size, bias=False)  # U (released: unpress)
        self.dynamics = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)  # W_dyn
        self.dynamics_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def inject(self, h: torch.Tensor, action_vectors: torch.Tensor) -> torch.Tensor:
        """h (..., hidden), action_vectors (..., codebook_dim) -> h + RMSNorm(W_dyn [h ; U e_a])."""
        a = self.action_proj(action_vectors).to(h.dtype)
        return h + self.dynamics_norm(self.dynamics(torch.cat([h, a.expand_as(h)], dim=-1)))

    def forward(self, input_ids, action_vectors, cos, sin, mask=None, kv_caches=None):
        """input_ids (batch, seq), action_vectors (batch, seq, codebook_dim) -> final hidden (batch, seq, hidden)."""
        h = self.run(self.embed_tokens(input_ids), cos, sin, mask, kv_caches, 0, self.action_layer)
        h = self.inject(h, action_vectors)
        return self.norm(self.run(h, cos, sin, mask, kv_caches, self.action_layer))


class InverseDynamics(Trunk):
    """Infers the action behind each token: a causal trunk whose output at t+1 labels position t."""

    def __init__(self, config: BWAreaConfig):
        super().__init__(config, config.inverse_layers)
        self.press = nn.Linear(config.hidden_size, config.codebook_dim, bias=False)

    def forward(self, input_ids, cos, sin, mask=None):
        """input_ids (batch, seq) -> action latents (batch, seq, codebook_dim), before quantisation."""
        h = self.norm(self.run(self.embed_tokens(input_ids), cos, sin, mask))
        # The action at t is read at t+1 (it must explain token t+1); the last position keeps its own output.
        h = torch.cat([h[:, 1:], h[:, -1:]], dim=1)
        return self.press(h)


class Policy(Trunk):
    """Chooses the action at t from tokens <= t: a causal trunk and a head over the actions.

    With ``config.value_head`` it also has ``q_head``, a learned action-value Q(s_t, .) over the actions read
    from the same final hidden state (trained by ``bwarea rl --algo q``, used by MCTS in place of rollouts).
    """

    def __init__(self, config: BWAreaConfig):
        super().__init__(config, config.policy_layers)
        self.head = nn.Linear(config.hidden_size, config.num_actions, bias=False)
        self.q_head = nn.Linear(config.hidden_size, config.num_actions) if config.value_head else None

    def final_hidden(self, input_ids, cos, sin, mask=None, kv_caches=None):
        """input_ids (batch, seq) -> the trunk's normalised output (batch, seq, hidden): what both heads read."""
        return self.norm(self.run(self.embed_tokens(input_ids), cos, sin, mask, kv_caches))

    def forward(self, input_ids, cos, sin, mask=None, kv_caches=None):
        """input_ids (batch, seq) -> action logits (batch, seq, num_actions), float32."""
        return self.head(self.final_hidden(input_ids, cos, sin, mask, kv_caches)).float()

    def add_q_head(self) -> None:
        """Give a policy without one a Q head, zero-initialised (Q = 0 for every action until trained)."""
        if self.q_head is None:
            w = self.head.weight
            self.q_head = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
            nn.init.zeros_(self.q_head.weight)
            nn.init.zeros_(self.q_head.bias)


class ActionCodebook(nn.Module):
    """The ``num_actions`` action vectors that the world model reads and the inverse dynamics snaps to."""

    def __init__(self, config: BWAreaConfig):
        super().__init__()
        self.embed = nn.Embedding(config.num_actions, config.codebook_dim)

    def nearest(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (..., dim) -> (index (...), quantised (..., dim)) by Euclidean distance.

        The quantised vectors carry a straight-through gradient to the latents (VQ-VAE).
        """
        # Distances in float32 even under autocast, so training and evaluation pick the same codes.
        with torch.autocast(latents.device.type, enabled=False):
            codes = self.embed.weight.float()
            flat = latents.reshape(-1, latents.shape[-1]).float()
            dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        index = dist.argmin(dim=1).view(latents.shape[:-1])
        quantised = self.embed(index)
        return index, latents + (quantised - latents).detach()

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.embed(index)


@dataclass
class BWAreaOutput(ModelOutput):
    """What the BWArea forward views return.

    logits: (batch, seq, vocab) for the world model views (normalised log-probabilities for the language-model
    view, ``forward`` without ``action_idx``), (batch, seq, num_actions) for ``forward_policy``.
    action_index: (batch, seq) the actions used (or chosen, for the policy; the policy's most likely ones for
    the language-model view, whose logits sum over all actions).
    last_hidden_state: (batch, seq, hidden) the world model's final hidden states (``forward(action_idx=)`` and
    ``forward_inverse``; None elsewhere).
    action_latents / action_vectors: (batch, seq, codebook_dim) the inverse-dynamics output before and after
    quantisation (``forward_inverse`` only; what the VQ losses need).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    action_index: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    action_latents: torch.Tensor | None = None
    action_vectors: torch.Tensor | None = None


class BWAreaForCausalLM(PreTrainedModel, BWAreaGenerationMixin):
    """A BWArea model: world model, inverse dynamics, policy and the action codebook.

    The call surface is the released one (``model(..., action_idx=)``, ``forward_inverse``,
    ``forward_policy``, ``set_action_sampling``, ``get_action_info``), plus ``generate``, ``fanout``,
    ``lm_logprobs`` and ``lm_log_likelihood`` from the ``generation`` package. ``model(input_ids)`` without actions is
    BWArea as a language model (``lm_logprobs``); ``forward_under_policy`` is the released uncached view.
    """

    config_class = BWAreaConfig
    base_model_prefix = "bwarea"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    def __init__(self, config: BWAreaConfig):
        super().__init__(config)
        self.world_model = WorldModel(config)
        self.inverse_dynamics = InverseDynamics(config)
        self.policy = Policy(config)
        self.action_codebook = ActionCodebook(config)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        # Sampled actions at the config's temperature (1 in the released models) until set_action_sampling says
        # otherwise.
        self.action_greedy, self.action_temperature = False, config.action_temperature
        self.action_info: dict[str, list[torch.Tensor]] = {"action_idx": []}
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    # ----- inputs ------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask):
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) tensor, got "
                             f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}")
        if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token (for example BOS)")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}")

    def positions_and_mask(self, attention_mask, batch: int, seq: int, device, dtype):
        """-> (cos, sin, mask) for a fresh sequence. Left padding gets per-row positions, so a padded row
        computes what it would alone; mask is None when nothing is padded (fast causal path)."""
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(seq, device=device).expand(batch, seq)
            mask = None
        else:
            valid = attention_mask.to(device=device, dtype=torch.bool)
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
            # Padded queries attend to themselves so no row is empty (an empty row makes NaNs).
            mask = (causal & valid[:, None, None, :]) | torch.eye(seq, dtype=torch.bool, device=device)
        cos, sin = self.rotary(positions, dtype)
        return cos, sin, mask

    def _check_actions(self, action_idx, input_ids) -> torch.Tensor:
        """int or (batch, seq) tensor -> (batch, seq) long tensor of actions, validated."""
        return check_action_index(action_idx, input_ids, self.config.num_actions)

    # transformers passes these to any causal LM; each is honoured only at its no-op value.
    # (use_cache changes nothing: every view runs uncached.)
    _NO_OP_FORWARD_KWARGS = {"output_attentions": (None, False), "output_hidden_states": (None, False),
                             "position_ids": (None,), "past_key_values": (None,), "inputs_embeds": (None,),
                             "use_cache": (None, False, True)}

    def _check_forward_kwargs(self, kwargs: dict, method: str = "forward") -> None:
        no_op = self._NO_OP_FORWARD_KWARGS
        unknown = sorted(k for k in kwargs if k not in no_op)
        if unknown:
            raise TypeError(f"{type(self).__name__}.{method} got unexpected arguments {unknown}")
        unsupported = sorted(k for k, v in kwargs.items() if not any(v is ok for ok in no_op[k]))
        if unsupported:
            raise ValueError(f"{type(self).__name__}.{method} cannot honour {unsupported}: give input_ids (positions "
                             f"follow attention_mask); no attentions, hidden states or caches are returned")

    def _dtype(self):
        return self.world_model.embed_tokens.weight.dtype

    # ----- the three parts -----------------------------------------------------------------------------
    def infer_actions(self, input_ids, attention_mask=None):
        """Inverse dynamics: -> (action_index (batch, seq), latents, straight-through action vectors)."""
        cos, sin, mask = self.positions_and_mask(attention_mask, *input_ids.shape, input_ids.device, self._dtype())
        latents = self.inverse_dynamics(input_ids, cos, sin, mask)
        index, vectors = self.action_codebook.nearest(latents)
        return index, latents, vectors

    def policy_logits(self, input_ids, attention_mask=None):
        """Policy: -> action logits (batch, seq, num_actions), float32."""
        cos, sin, mask = self.positions_and_mask(attention_mask, *input_ids.shape, input_ids.device, self._dtype())
        return self.policy(input_ids, cos, sin, mask)

    def action_values(self, input_ids, attention_mask=None):
        """The learned action-value: -> Q(s_t, a) (batch, seq, num_actions), float32, for the state after the
        tokens <= t. Needs a model with a value head (``config.value_head``; ``bwarea rl --algo q`` trains one)."""
        if self.policy.q_head is None:
            raise ValueError("this model has no value head (config.value_head is false): train one with "
                             "`bwarea rl --algo q`, or search with reward rollouts")
        cos, sin, mask = self.positions_and_mask(attention_mask, *input_ids.shape, input_ids.device, self._dtype())
        return self.policy.q_head(self.policy.final_hidden(input_ids, cos, sin, mask)).float()

    def world_logits(self, input_ids, action_vectors, attention_mask=None):
        """World model under given action vectors (batch, seq, codebook_dim) -> (logits float32, hidden)."""
        cos, sin, mask = self.positions_and_mask(attention_mask, *input_ids.shape, input_ids.device, self._dtype())
        hidden = self.world_model(input_ids, action_vectors, cos, sin, mask)
        return self.world_model.lm_head(hidden).float(), hidden

    def sample_actions(self, logits: torch.Tensor, greedy: bool | None = None,
                       temperature: float | None = None) -> torch.Tensor:
        """(..., num_actions) logits -> (...) actions: argmax, or a sample from softmax(logits / temperature)."""
        greedy = self.action_greedy if greedy is None else greedy
        temperature = self.action_temperature if temperature is None else temperature
        if greedy:
            return logits.argmax(-1)
        if temperature <= 0:
            raise ValueError(f"action temperature must be > 0 when sampling actions, got {temperature}")
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])

    # ----- the released call surface --------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, action_idx=None, labels=None, return_dict=True,
                use_cache=None, **unused):
        """Two views, chosen by ``action_idx``.

        Without ``action_idx``: BWArea as a language model (``lm_logprobs``). ``logits`` (batch, seq, vocab)
        float32 is, at every position t, the normalised log of the mixture
        log sum_a pi(a | x_<=t) p_world(. | x_<=t, inverse-dynamics actions before t, a): leak-free,
        deterministic, and the same whatever the batch size, padding (left or right, with ``attention_mask``) or
        batch neighbours; padded positions hold a valid distribution that callers mask. ``labels`` (batch, seq)
        gives ``loss``, the exact mean next-token NLL (-100 ignored). ``action_index`` (batch, seq) is the
        policy's most likely action at each position, for information (the logits sum over all actions);
        ``last_hidden_state`` is None (there is one per action). Nothing is added to ``get_action_info``.

        With ``action_idx`` (int, or (batch, seq) tensor): the world model under those actions at every position
        (its logits, not normalised), as released; ``action_index`` echoes them.

        ``forward_inverse`` is the training view (it sees the next token: never a language-model score),
        ``forward_policy`` the policy, ``forward_under_policy`` the released ``model(input_ids, attention_mask)``.
        """
        self._check_forward_kwargs(unused)
        self._check_inputs(input_ids, attention_mask)
        if action_idx is None:
            logprobs, log_pi = self._mixture(input_ids, attention_mask, None)
            loss = None if labels is None else next_token_loss(logprobs, labels)
            out = BWAreaOutput(loss=loss, logits=logprobs, action_index=log_pi.argmax(-1))
            return out if return_dict else out.to_tuple()
        actions = self._check_actions(action_idx, input_ids)
        logits, hidden = self.world_logits(input_ids, self.action_codebook(actions), attention_mask)
        loss = None if labels is None else next_token_loss(logits, labels)
        out = BWAreaOutput(loss=loss, logits=logits, action_index=actions, last_hidden_state=hidden)
        return out if return_dict else out.to_tuple()

    def forward_under_policy(self, input_ids, attention_mask=None, labels=None, return_dict=True):
        """The released ``model(input_ids, attention_mask)`` (what ``bwareaModel`` serves): the world model at
        every position under the policy's action there, the context before it understood.

        -> logits (batch, seq, vocab) float32: at t, the world model's logits after x_<=t with the
        inverse-dynamics actions at s < t and, at t, the policy's action sampled per ``set_action_sampling``
        (greedy: its argmax); ``action_index`` (batch, seq) those policy actions, the last column of which is
        appended to ``get_action_info``; ``loss`` with ``labels``. Leak-free: nothing at t reads a token after
        t. Left or right padding with ``attention_mask``; padded positions hold values that callers mask.
        """
        self._check_inputs(input_ids, attention_mask)
        actions = self.sample_actions(self.policy_logits(input_ids, attention_mask))
        logits = self.world_logits_per_position(input_ids, attention_mask, actions)
        self.action_info["action_idx"].append(actions[:, -1:])
        loss = None if labels is None else next_token_loss(logits, labels)
        out = BWAreaOutput(loss=loss, logits=logits, action_index=actions)
        return out if return_dict else out.to_tuple()

    def forward_inverse(self, input_ids, attention_mask=None, labels=None, return_dict=True, **unused):
        """The training (reconstruction) view: the world model under the inverse-dynamics actions.

        The action at t is inferred from tokens <= t+1, so these logits have seen the token they predict: they
        are what stage-1 training fits and what ``id_ppl`` reports, never a language-model score (use
        ``forward`` or ``lm_logprobs``). -> logits (batch, seq, vocab), action_index (batch, seq) (the last has
        no next token to explain), action_latents / action_vectors for the VQ losses, ``loss`` with ``labels``.
        """
        self._check_forward_kwargs(unused, "forward_inverse")
        self._check_inputs(input_ids, attention_mask)
        index, latents, vectors = self.infer_actions(input_ids, attention_mask)
        logits, hidden = self.world_logits(input_ids, vectors, attention_mask)
        loss = None if labels is None else next_token_loss(logits, labels)
        out = BWAreaOutput(loss=loss, logits=logits, action_index=index, last_hidden_state=hidden,
                           action_latents=latents, action_vectors=vectors)
        return out if return_dict else out.to_tuple()

    def forward_policy(self, input_ids, attention_mask=None, return_dict=True, **unused):
        """The policy: logits (batch, seq, num_actions) over the actions (not tokens), and action_index (batch,
        seq) chosen per ``set_action_sampling``; the last column is appended to ``get_action_info``."""
        self._check_forward_kwargs(unused, "forward_policy")
        self._check_inputs(input_ids, attention_mask)
        logits = self.policy_logits(input_ids, attention_mask)
        index = self.sample_actions(logits)
        self.action_info["action_idx"].append(index[:, -1:])
        out = BWAreaOutput(logits=logits, action_index=index)
        return out if return_dict else out.to_tuple()

    def set_action_sampling(self, greedy: bool = True, temp: float = 1.0) -> None:
        """How the policy picks actions everywhere: argmax (greedy) or a sample at temperature ``temp``."""
        if not greedy and temp <= 0:
            raise ValueError(f"action temperature must be > 0 when sampling actions, got {temp}")
        self.action_greedy, self.action_temperature = bool(greedy), float(temp)

    def reset_action_info(self) -> None:
        self.action_info["action_idx"].clear()

    def get_action_info(self) -> dict[str, list[torch.Tensor]]:
        """{"action_idx": [(batch, 1) tensor per policy call]}: the actions the policy chose, in order."""
        return self.action_info

    # ----- vocabulary and weights I/O ---------------------------------------------------------------
    def get_input_embeddings(self):
        return self.world_model.embed_tokens

    def set_input_embeddings(self, value):
        self.world_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.world_model.lm_head

    def resize_token_embeddings(self, new_num_tokens: int, *args, **kwargs):
        """Resize all three token embeddings and the LM head; new rows start at the mean of the old ones."""
        for trunk in (self.world_model, self.inverse_dynamics, self.policy):
            trunk.embed_tokens = _resized(trunk.embed_tokens, new_num_tokens)
        self.world_model.lm_head = _resized(self.world_model.lm_head, new_num_tokens)
        self.config.vocab_size = new_num_tokens
        return self.world_model.embed_tokens

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs) -> "BWAreaForCausalLM":
        """Load a bwarea or released-BWArea checkpoint folder (format detected from config.json).

        kwargs: ``dtype`` (or ``torch_dtype``): a torch dtype, its name, or "auto" for the stored dtype
        (default float32); ``device``; ``allow_pickle=True`` to read ``pytorch_model.bin`` files.
        """
        return checkpoint.load_model(cls, path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Write config.json and model.safetensors atomically (a crash leaves the old files intact)."""
        checkpoint.save_model(self, save_directory, *args, **kwargs)


def _resized(module: nn.Module, n: int) -> nn.Module:
    old = module.weight.data
    if n == old.shape[0]:
        return module
    new = old.new_empty((n, old.shape[1]))
    keep = min(n, old.shape[0])
    new[:keep] = old[:keep]
    new[keep:] = old.mean(dim=0, keepdim=True)
    if isinstance(module, nn.Embedding):
        out = nn.Embedding(n, old.shape[1], device=old.device, dtype=old.dtype)
    else:
        out = nn.Linear(old.shape[1], n, bias=False, device=old.device, dtype=old.dtype)
    out.weight.data = new
    return out


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t+1], ignoring -100."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


# transformers' Auto classes find BWArea from the moment this module loads (see bwarea/__init__.py).
AutoConfig.register("bwarea", BWAreaConfig, exist_ok=True)
AutoModelForCausalLM.register(BWAreaConfig, BWAreaForCausalLM, exist_ok=True)
