"""Generation for BWArea models: prefill / decode loop, sampling, action controls, fan-out, exact likelihood.

BWArea as a language model (paper, seed README):

* the inverse dynamics model *understands* the prompt: prompt positions 0..T-2 get its actions;
* the policy chooses the action at the last prompt position and at every generated position;
* the world model writes each next token from its (token, action) history.

``generate`` runs that with one prefill (inverse dynamics, policy and world model over the prompt) and then,
per new token, one policy step and one world-model step over preallocated KV caches. The inverse dynamics
never runs while decoding. ``prompt_actions="policy"`` gives the released cached generate instead (policy
actions at every prompt position).

``fanout`` gives the next-token logits under every action; ``lm_logprobs`` the exact next-token
log-distribution of BWArea as a language model at every position (a logsumexp over the actions, what
``model(input_ids)`` returns) and ``lm_log_likelihood`` the same at the next tokens; ``world_logits_per_position``
the world model at every position under one given action there (the released ``model(input_ids)``). All run the
action-independent work once and the world model's upper half (from the action layer on) per action.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from . import kernels

# transformers' generate keywords (and GenerationConfig fields) that are honoured at these values only: bwarea
# always decodes with a KV cache (use_cache changes speed, never tokens), runs one beam, returns no scores,
# attentions or hidden states and syncs no GPUs. Any other value, or any other keyword, is an error naming it.
_NO_OP_GENERATE_VALUES = {"use_cache": (True, False), "num_beams": (1,), "output_scores": (False,),
                          "output_logits": (False,), "output_attentions": (False,),
                          "output_hidden_states": (False,), "synced_gpus": (False,)}
# generate's own defaults, where neither a keyword nor generation_config sets a value.
_GENERATE_DEFAULTS = {"max_new_tokens": None, "max_length": None, "min_new_tokens": None, "min_length": None,
                      "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": 1.0,
                      "repetition_penalty": 1.0, "eos_token_id": None, "pad_token_id": None, "bos_token_id": None,
                      "num_return_sequences": 1, "stop_strings": None, "return_dict_in_generate": False}


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


# ----- KV caches --------------------------------------------------------------------------------------------
class StaticKVCache:
    """Keys and values of one attention block, preallocated for the whole generation and written in place.

    keys / values: (batch, kv_heads, max_len, head_dim). ``update(k, v)`` (what the model's Attention calls)
    writes the new positions after the ones held and returns views of everything held so far.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.keys = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions, asked to write {start}..{end}")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class PrefixKVCache:
    """A shared context's keys/values followed by each query row's own: many action variants, one context.

    keys / values: (batch, kv_heads, prefix, head_dim); the queries come ``copies`` rows per batch row.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, copies: int):
        self.keys, self.values = (t.repeat_interleave(copies, dim=0) for t in (keys, values))

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)


def _caches(model, trunk, batch: int, max_len: int, layers=None) -> list:
    """One StaticKVCache per block of ``trunk`` (None for blocks outside ``layers``)."""
    c, dtype = model.config, model._dtype()
    device = trunk.embed_tokens.weight.device
    wanted = range(len(trunk.layers)) if layers is None else layers
    return [StaticKVCache(batch, c.num_key_value_heads, max_len, c.head_dim, dtype, device) if i in wanted
            else None for i in range(len(trunk.layers))]


# Pairing copies the paired blocks' weights (``_stacked_pair_weights``): worth it where per-op overhead rules the
# step, i.e. small models; above this many bytes of paired weights the decode step runs the blocks one by one.
_PAIRED_BYTES_LIMIT = 256 * 2**20
# A decode step of at least this many rows multiplies with weights packed for oneDNN (``kernels.pack``, a copy of
# the decode matrices, kept up to this many bytes) where oneDNN is available: 0.73 ms (17%) off the benchmark's
# batch-8 step; at 1-2 rows the per-call cost of oneDNN loses to the bmm over column blocks.
_PACKED_MIN_ROWS = 4
_PACKED_BYTES_LIMIT = 512 * 2**20


def _decode_pairs(model, device) -> int:
    """How many leading (policy block, world-model block) pairs the CPU decode step runs as one stacked block.

    Both blocks of a pair read only the fed token (the action enters the world model at ``action_layer``), so
    they run side by side: every product is one bmm over the two weights (a thread each), or two oneDNN
    products, and every other op runs once for both. That halves the op count of those layers, which is what a
    small model's step costs on CPU."""
    if device.type not in _Decoder.plain_attention_on:
        return 0
    pairs = min(model.world_model.action_layer, len(model.policy.layers))
    size = sum(p.numel() * p.element_size() for i in range(pairs) for p in model.policy.layers[i].parameters())
    return pairs if 0 < 2 * size <= _PAIRED_BYTES_LIMIT else 0


def _pair_caches(policy_caches, world_caches, pairs: int) -> list:
    """Put the first ``pairs`` policy and world-model caches in one buffer each for keys and values,
    (2, batch, kv_heads, max_len, head_dim), index 0 the policy's -> those (keys, values) buffers per pair."""
    joint = []
    for p, w in zip(policy_caches[:pairs], world_caches[:pairs]):
        keys, values = p.keys.new_zeros((2, *p.keys.shape)), p.values.new_zeros((2, *p.values.shape))
        p.keys, w.keys, p.values, w.values = keys[0], keys[1], values[0], values[1]
        joint.append((keys, values))
    return joint


def _derived_weights(model, attr: str, sources, build):
    """``build()`` (run without autograd), cached on the model as ``attr`` until a tensor of ``sources``
    changes storage or is updated in place: an optimiser step bumps its version (RL updates the policy between
    rollouts). Parameters made under inference_mode carry no version; they cannot be updated outside it."""
    key = tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in sources)
    cached = getattr(model, attr, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        value = build()
    setattr(model, attr, (key, value))
    return value


_PAIRED_WEIGHTS = ("input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj", "post_attention_layernorm",
                   "mlp.gate_up_proj", "mlp.down_proj")


def _stacked_pair_weights(model, pairs: int) -> list:
    """Per pair, ``_PAIRED_WEIGHTS`` stacked policy first: norms (2, 1, hidden), matrices (2, in, out)."""
    blocks = [(model.policy.layers[i], model.world_model.layers[i]) for i in range(pairs)]

    def build():
        return [tuple(torch.stack(w)[:, None] if w[0].dim() == 1 else torch.stack([t.t() for t in w]).contiguous()
                      for w in ([block.get_submodule(name).weight for block in pair] for name in _PAIRED_WEIGHTS))
                for pair in blocks]
    return _derived_weights(model, "_decode_pair_cache", [t for pair in blocks for b in pair for t in b.parameters()],
                            build)


def _decode_matrices(model) -> dict:
    """The (out, in) matrices a decode step multiplies by, by parameter id, in two groups: the policy's, and the
    world model's (W_dyn's hidden half under "dyn_h")."""
    world, policy = model.world_model, model.policy
    groups = {}
    for name, trunk, head in (("policy", policy, policy.head), ("world", world, world.lm_head)):
        mats = {id(p): p for block in trunk.layers for p in block.parameters() if p.dim() == 2}
        groups[name] = mats | {id(head.weight): head.weight}
    groups["world"]["dyn_h"] = world.dynamics.weight[:, :model.config.hidden_size]
    return groups


def _packed_weights(model, device, rows: int) -> dict | None:
    """``_decode_matrices`` packed for oneDNN where a decode step of ``rows`` rows multiplies with them (float32
    on CPU, from ``_PACKED_MIN_ROWS`` rows, up to ``_PACKED_BYTES_LIMIT``, oneDNN usable), else None. Cached on
    the model like ``_stacked_pair_weights``, per group: RL updates only the policy, and the world model's
    packed copy stays."""
    if device.type != "cpu" or rows < _PACKED_MIN_ROWS or model.world_model.lm_head.weight.dtype != torch.float32:
        return None
    groups = _decode_matrices(model)
    size = sum(t.numel() * t.element_size() for mats in groups.values() for t in mats.values())
    if size > _PACKED_BYTES_LIMIT or not kernels.onednn_available():
        return None
    packed = {}
    for name, mats in groups.items():
        packed |= _derived_weights(model, f"_decode_packed_{name}", list(mats.values()),
                                   lambda mats=mats: {k: kernels.pack(w) for k, w in mats.items()})
    return packed


# ----- the single-position decode step -------------------------------------------------------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm without the module call; in float32 one fused op (the same math)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class _StepThreads:
    """How many threads each decode step runs on: torch's thread count n, or one where that is faster now.

    A step of a few rows is ~80 small ops, and on n threads each one is a fork-join of all n. With a core free
    for every thread that runs the benchmark's step ~1.5x faster than one thread. When other work keeps the
    cores busy (a second bwarea worker, a training job), a join waits for a descheduled thread, a scheduler slice
    of milliseconds, while OpenMP's spin-waiting threads hold the cores the others need: a 2.4 ms step took up
    to 700 ms. One thread never waits on another; it slows only by its share of a core.

    So steps are timed and run on whichever count was clearly faster when last timed: the first step on one thread,
    the next on n, then the other count again after 8, 16, ... up to ``RETRY_MAX`` steps (8 again after a
    change). A step on n threads that runs past ``OVERRUN`` times the last one-thread step finishes on one
    thread (``check``, between the parts of each block), so timing n under load costs about one step. Outside
    ``run`` torch's setting is back in place. Results do not depend on the count: the column blocks
    (``_Decoder._split``) stay those of n threads, and each block's product is the same on any thread."""

    RETRY_FIRST, RETRY_MAX = 8, 256
    OVERRUN = 2.0  # under real contention a step on n threads takes many times longer: noise does not
    SWITCH = 0.9  # the other count must take under this fraction of the current one's time

    def __init__(self, threads: int, clock=time.perf_counter):
        self.threads, self.clock = threads, clock  # torch's setting when decoding started
        self.current = threads  # the count steps run on between re-timings
        self.seconds = {}  # count -> its last timed step
        self.step, self.retry_at, self.interval = 0, 0, self.RETRY_FIRST
        self.count = self.live = threads  # this step's count, and the threads it runs on now
        self.elapsed, self.deadline, self.started = 0.0, None, 0.0
        self.best = float("inf")  # the fastest step on the current count since the last decision

    def begin(self):
        """Start a step: its count (the other one at a re-timing), and when to give up on n threads."""
        if self.threads == 1:
            return
        if self.step == self.retry_at:
            self.count = 1 if self.current != 1 else self.threads
        else:
            self.count = self.current
        self.live, self.elapsed = self.count, 0.0
        self.deadline = self.OVERRUN * self.seconds[1] if self.count != 1 and 1 in self.seconds else None

    @contextmanager
    def run(self):
        """One part of the step (``lower_step``, ``upper_step``) on the step's threads; torch's setting after."""
        if self.threads == 1:
            yield
            return
        setting = torch.get_num_threads()
        torch.set_num_threads(self.live)
        self.started = self.clock()
        try:
            yield
        finally:
            self.elapsed += self.clock() - self.started
            torch.set_num_threads(setting)

    def check(self):
        """Between blocks: a step on n threads past its deadline goes on with one."""
        if self.deadline is not None and self.elapsed + self.clock() - self.started > self.deadline:
            self.deadline, self.live = None, 1
            torch.set_num_threads(1)

    def end(self):
        """End a step: keep its time; at a re-timing, or when n threads overran, run on the faster count."""
        if self.threads == 1:
            return
        self.seconds[self.count] = self.elapsed
        overran = self.live != self.count
        if self.count == self.current and not overran:
            self.best = min(self.best, self.elapsed)
        if self.step == self.retry_at or overran:
            other = 1 if self.current != 1 else self.threads
            if self.threads not in self.seconds:
                faster = 1  # only one thread timed yet: time n next
            else:
                # A change needs a clear win over the current count at its best since the last decision: on a
                # quiet machine one slow step is noise. A step of the current count that overran is load now.
                mine = self.elapsed if overran and self.count == self.current else \
                    min(self.best, self.seconds[self.current])
                faster = other if self.seconds[other] < self.SWITCH * mine else self.current
            self.best = float("inf")
            self.interval = self.RETRY_FIRST if faster != self.current else min(2 * self.interval, self.RETRY_MAX)
            self.current = faster
            self.retry_at = self.step + (self.interval if self.threads in self.seconds else 1)
        self.step += 1


class _Decoder:
    """One position through the policy and the world model, over their StaticKVCaches.

    This is ``Block.forward`` for a single position with the weights read directly: at the model sizes a CPU
    decodes, module calls and per-step Python objects cost more than the matrix products, so the step is
    a flat list of tensor ops over (batch, hidden) rows. Numerically it is the block's math; rotary is applied
    to q and k together as x*cos + roll(x, d/2)*sin_signed (that is rotate_half), and the action injection
    splits W_dyn [h ; U e_a] into W_h h + (W_a U e_a), the second term tabulated once per action.

    On CPU every product of the few rows with a weight runs as a bmm over ``torch.get_num_threads()`` column
    blocks of that weight (views, no copies): torch runs a skinny mm on one core, and a bmm over blocks on all
    of them, which is ~1.7x faster here since decoding is bound by reading the weights, while the cores are free
    (``_StepThreads`` runs steps on one thread while other work holds them). Column-major weights
    (``optimize_for_cpu_decoding``) read faster still. The policy's and the world model's blocks below the action
    read only the token, so on CPU they run in pairs (``_decode_pairs``, ``_pair_block``): half the ops for those
    layers, which took 6% off the benchmark's batch-8 generate and 16% off batch 1 (the copy costs 23 MB there).

    From ``_PACKED_MIN_ROWS`` rows on, a float32 CPU step multiplies through oneDNN instead, with every decode
    matrix packed once for it (``kernels``; the residual adds ride in the products): at a few rows a product
    is no longer bound by reading the weight alone, and MKL's AVX2 kernels (on AMD) fall behind oneDNN's.
    """

    # Device types that attend with two bmms and a softmax rather than SDPA: SDPA's CPU kernel costs more than
    # that for the few query rows of a decode step; on GPUs SDPA is one fused kernel launch instead of four.
    plain_attention_on = ("cpu",)

    def __init__(self, model, policy_caches, world_caches, cos, sin, key_bias, joint_caches=()):
        """cos, sin (rows, 1, steps, head_dim): rotary of the fed positions; key_bias (rows, 1, 1, cache length)
        0 / -inf for the cache columns each row may / may not attend to (left padding), or None; joint_caches:
        ``_pair_caches``' buffers, one per leading block pair to run stacked."""
        c = model.config
        self.n_heads, self.n_kv, self.head_dim, self.eps = (c.num_attention_heads, c.num_key_value_heads,
                                                             c.head_dim, c.rms_norm_eps)
        on_cpu = cos.device.type == "cpu"
        self.blocks = torch.get_num_threads() if on_cpu else 1
        self.threads = _StepThreads(self.blocks)  # one thread per step where that is faster now
        world, policy = model.world_model, model.policy
        # oneDNN-packed weights (looked up by parameter) and their product, or column-block views and the bmm.
        self.packed = _packed_weights(model, cos.device, cos.shape[0])
        self.linear = self._linear if self.packed is None else kernels.packed_linear
        self.policy_layers = None if policy_caches is None else [
            self._weights(b, k) for b, k in zip(policy.layers, policy_caches)]
        self.world_layers = [self._weights(b, k) for b, k in zip(world.layers, world_caches)]
        self.action_layer = world.action_layer
        self.policy_embed, self.policy_norm = policy.embed_tokens.weight, policy.norm.weight
        self.policy_head = self._prepare(policy.head.weight)
        self.world_embed, self.world_norm = world.embed_tokens.weight, world.norm.weight
        self.lm_head, self.dynamics_norm = self._prepare(world.lm_head.weight), world.dynamics_norm.weight
        h = c.hidden_size
        w_dyn = world.dynamics.weight
        self.dyn_h = self.packed["dyn_h"] if self.packed is not None else self._split(w_dyn[:, :h])
        projected = world.action_proj(model.action_codebook.embed.weight).to(w_dyn.dtype)
        self.action_table = F.linear(projected, w_dyn[:, h:])  # (num_actions, hidden)
        # Rotary for the fed positions: lists of (batch, heads + kv_heads, head_dim) views, one per step.
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(sin)
        self.plain_attention = cos.device.type in self.plain_attention_on
        self.scale = self.head_dim ** -0.5
        # The plain path folds the softmax scale into the query heads' rows of the tables (one op less a block).
        heads = torch.ones(self.n_heads + self.n_kv, 1, 1, dtype=cos.dtype, device=cos.device)
        if self.plain_attention:
            heads[:self.n_heads] = self.scale
        self.cos = (cos * heads).permute(2, 0, 1, 3).unbind(0)
        self.sin = (sin * sign * heads).permute(2, 0, 1, 3).unbind(0)
        self.key_bias = key_bias
        if key_bias is not None and self.plain_attention:  # as (rows * kv_heads, 1, keys), for the bmm scores
            self.key_bias = key_bias.expand(-1, self.n_kv, -1, -1).flatten(0, 1)
        self.pairs = len(joint_caches)
        if self.packed is None:
            weights = _stacked_pair_weights(model, self.pairs)
            self.pair_linear = self._pair_bmm
        else:  # the norms stacked (2, 1, hidden), each matrix as its (policy, world model) packed pair
            weights = [tuple(torch.stack([p, w])[:, None] if torch.is_tensor(p) and p.dim() == 1 else (p, w)
                             for p, w in zip(self.policy_layers[i][:6], self.world_layers[i][:6]))
                       for i in range(self.pairs)]
            self.pair_linear = self._pair_packed
        self.paired_layers = [(*w, keys, values, keys.flatten(0, 2), values.flatten(0, 2))
                              for w, (keys, values) in zip(weights, joint_caches)]
        self.pair_key_bias = None if self.key_bias is None or not self.pairs else self.key_bias.repeat(2, 1, 1)

    def _prepare(self, weight):
        """A parameter (out, in) -> the form ``self.linear`` multiplies by."""
        return self._split(weight) if self.packed is None else self.packed[id(weight)]

    def _split(self, weight):
        """(out, in) weight -> (blocks, in, out / blocks) view for ``_linear``, or (in, out) when not split."""
        n, t = self.blocks, weight.t()
        if n == 1 or weight.shape[0] % n:
            return t
        if t.is_contiguous():  # column-major weight: each block is a run of whole rows of t
            return t.view(t.shape[0], n, -1).permute(1, 0, 2)
        return weight.view(n, -1, weight.shape[1]).transpose(1, 2)

    @staticmethod
    def _linear(x, weight, residual=None):
        """x (rows, in) times a ``_split`` weight -> (rows, out), plus ``residual`` (rows, out) in the same op."""
        if weight.dim() == 2:
            return torch.mm(x, weight) if residual is None else torch.addmm(residual, x, weight)
        n, rows = weight.shape[0], x.shape[0]
        xs = x.expand(n, rows, x.shape[1])
        y = torch.bmm(xs, weight) if residual is None else torch.baddbmm(
            residual.view(rows, n, -1).transpose(0, 1), xs, weight)
        return y.transpose(0, 1).reshape(rows, -1)

    def _weights(self, block, cache):
        a, m = block.self_attn, block.mlp
        return (block.input_layernorm.weight, self._prepare(a.qkv_proj.weight), self._prepare(a.o_proj.weight),
                block.post_attention_layernorm.weight, self._prepare(m.gate_up_proj.weight),
                self._prepare(m.down_proj.weight), cache.keys, cache.values, cache.keys.flatten(0, 1),
                cache.values.flatten(0, 1))

    def _block(self, x, layer, step, col):
        ln1, w_qkv, w_o, ln2, w_gate_up, w_down, keys, values, keys_3d, values_3d = layer
        self.threads.check()  # here and between the block's parts: has a step on n threads run too long?
        b, nh, nkv = x.shape[0], self.n_heads, self.n_kv
        qkv = self.linear(_rms(x, ln1, self.eps), w_qkv).view(b, nh + 2 * nkv, self.head_dim)
        qk = qkv[:, :nh + nkv]
        qk = torch.addcmul(qk * self.cos[step], qk.roll(self.head_dim // 2, -1), self.sin[step])
        keys[:, :, col] = qk[:, nh:]
        values[:, :, col] = qkv[:, nh + nkv:]
        # The query heads sharing a KV head go in as that head's query rows: grouped-query attention with no
        # copy of the cache (head h reads KV head h // group, as in the model).
        if self.plain_attention:
            # queries (b, heads, d), already scaled: as (b * kv_heads, group, d) rows of a bmm
            queries = qk[:, :nh].reshape(b * nkv, -1, self.head_dim)
            scores = torch.bmm(queries, keys_3d[:, :col + 1].transpose(1, 2))
            if self.key_bias is not None:
                scores += self.key_bias[..., :col + 1]
            y = torch.bmm(scores.softmax(-1), values_3d[:, :col + 1])
        else:
            y = F.scaled_dot_product_attention(
                qk[:, :nh].view(b, nkv, nh // nkv, self.head_dim), keys[:, :, :col + 1], values[:, :, :col + 1],
                attn_mask=None if self.key_bias is None else self.key_bias[..., :col + 1])
        self.threads.check()
        x = self.linear(y.view(b, -1), w_o, x)
        self.threads.check()
        h = _rms(x, ln2, self.eps)
        if self.packed is None and w_gate_up.dim() == 3 and w_gate_up.shape[0] == 2:
            # two column blocks are exactly [gate; up]: read them from the bmm's output, no transpose copy
            gate, up = torch.bmm(h.expand(2, *h.shape), w_gate_up).unbind(0)
        else:
            gate, up = self.linear(h, w_gate_up).chunk(2, dim=-1)
        return self.linear(F.silu(gate) * up, w_down, x)

    def _pair_block(self, x, layer, step, col):
        """``_block`` for a policy block and a world-model block at once: x (2, batch, hidden), policy first.
        Each product is one ``pair_linear`` of the two weights, each other op runs once for both."""
        ln1, w_qkv, w_o, ln2, w_gate_up, w_down, keys, values, keys_3d, values_3d = layer
        self.threads.check()
        m, b, hidden = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        linear = self.pair_linear
        qkv = linear(F.rms_norm(x, (hidden,), eps=self.eps) * ln1, w_qkv).view(m, b, nh + 2 * nkv, d)
        qk = qkv[:, :, :nh + nkv]
        qk = torch.addcmul(qk * self.cos[step], qk.roll(d // 2, -1), self.sin[step])  # queries pre-scaled
        keys[:, :, :, col] = qk[:, :, nh:]
        values[:, :, :, col] = qkv[:, :, nh + nkv:]
        scores = torch.bmm(qk[:, :, :nh].reshape(m * b * nkv, -1, d), keys_3d[:, :col + 1].transpose(1, 2))
        if self.pair_key_bias is not None:
            scores += self.pair_key_bias[..., :col + 1]
        y = torch.bmm(scores.softmax(-1), values_3d[:, :col + 1])
        self.threads.check()
        x = linear(y.view(m, b, nh * d), w_o, x)
        self.threads.check()
        gate, up = linear(F.rms_norm(x, (hidden,), eps=self.eps) * ln2, w_gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, w_down, x)

    @staticmethod
    def _pair_bmm(x, weights, residual=None):
        """x (2, rows, in) times the stacked weights (2, in, out): one bmm, a thread per weight on 2 cores."""
        return torch.bmm(x, weights) if residual is None else torch.baddbmm(residual, x, weights)

    @staticmethod
    def _pair_packed(x, weights, residual=None):
        """x (2, rows, in) times a (policy, world model) pair of packed weights: a oneDNN product per half,
        stacked back for the ops that run once for both."""
        mm = kernels.packed_linear
        if residual is None:
            return torch.stack([mm(x[0], weights[0]), mm(x[1], weights[1])])
        return torch.stack([mm(x[0], weights[0], residual[0]), mm(x[1], weights[1], residual[1])])

    def lower_step(self, tokens, step, col, policy=True):
        """tokens (batch,) at cache column ``col`` -> (action logits (batch, num_actions) float32 or None
        without ``policy``, the world model's hidden state before the action enters). Starts a step; ``upper_step``
        ends it."""
        self.threads.begin()
        with self.threads.run():
            xw = F.embedding(tokens, self.world_embed)
            if not policy:
                for layer in self.world_layers[:self.action_layer]:
                    xw = self._block(xw, layer, step, col)
                return None, xw
            xp = F.embedding(tokens, self.policy_embed)
            if self.pairs:
                x = torch.stack([xp, xw])
                for layer in self.paired_layers:
                    x = self._pair_block(x, layer, step, col)
                xp, xw = x.unbind(0)
            for layer in self.policy_layers[self.pairs:]:
                xp = self._block(xp, layer, step, col)
            for layer in self.world_layers[self.pairs:self.action_layer]:
                xw = self._block(xw, layer, step, col)
            return self.linear(_rms(xp, self.policy_norm, self.eps), self.policy_head).float(), xw

    def upper_step(self, x, actions, step, col):
        """``lower_step``'s world hidden state, actions (batch,) -> next-token logits (batch, vocab) float32."""
        with self.threads.run():
            x = self._inject(x, actions)
            for layer in self.world_layers[self.action_layer:]:
                x = self._block(x, layer, step, col)
            logits = self.linear(_rms(x, self.world_norm, self.eps), self.lm_head).float()
        self.threads.end()
        return logits

    def _inject(self, x, actions):
        mixed = self.linear(x, self.dyn_h, F.embedding(actions, self.action_table))
        return x + _rms(mixed, self.dynamics_norm, self.eps)


# ----- choosing actions and tokens -----------------------------------------------------------------------------
# Below this temperature a sample is the argmax up to float rounding, and logits / temperature can overflow
# float32: tokens and actions are chosen greedily (the limit). Beyond PENALTY_RANGE a repetition penalty over- or
# underflows float32 logits, and its effect is already total: it acts as the nearer bound.
GREEDY_BELOW = 1e-5
PENALTY_RANGE = (1e-30, 1e30)


class _ActionChooser:
    """The action at each new position: the schedule where it fixes one, else the policy (masked, greedy or
    sampled at a temperature)."""

    def __init__(self, model, rows, steps, actions, allowed_actions, greedy, temperature, generator,
                 batch, copies, device):
        n = model.config.num_actions
        self.greedy = model.action_greedy if greedy is None else bool(greedy)
        self.temperature = model.action_temperature if temperature is None else float(temperature)
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"action_temperature must be > 0 when sampling actions, got {self.temperature}")
        self.greedy = self.greedy or self.temperature < GREEDY_BELOW
        self.generator = generator
        self.schedule = _action_schedule(actions, n, steps, batch, copies, device)
        self.allowed = _allowed_mask(allowed_actions, n, batch, copies, device)
        if self.schedule is not None and self.allowed is not None:
            fixed = self.schedule >= 0
            bad = fixed & ~self.allowed.expand(rows, n).gather(1, self.schedule.clamp(min=0))
            if bool(bad.any()):
                row, step = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"actions fixes action {int(self.schedule[row, step])} at step {step} (row {row}) "
                                 "but allowed_actions forbids it")
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


def _action_schedule(actions, n, steps, batch, copies, device):
    """int / (steps,) / (batch, steps) with -1 = policy -> (batch*copies, steps) long, or None."""
    if actions is None:
        return None
    if isinstance(actions, bool):
        raise ValueError("actions must be an int, a list or a tensor of action indices, not a bool")
    if isinstance(actions, int):
        if not 0 <= actions < n:
            raise ValueError(f"actions={actions} is outside [0, {n})")
        return torch.full((batch * copies, steps), actions, dtype=torch.long, device=device)
    schedule = torch.as_tensor(actions, device=device)
    if schedule.dtype.is_floating_point or schedule.dtype == torch.bool:
        raise ValueError(f"actions must hold integer action indices, got dtype {schedule.dtype}")
    schedule = schedule.long()
    if schedule.dim() == 1:
        schedule = schedule.expand(batch, -1)
    if schedule.dim() != 2 or schedule.shape[0] != batch or schedule.shape[1] != steps:
        raise ValueError(f"actions schedule has shape {tuple(torch.as_tensor(actions).shape)}; give "
                         f"max_new_tokens={steps} entries, as ({steps},) or (batch={batch}, {steps})")
    if steps and (int(schedule.min()) < -1 or int(schedule.max()) >= n):
        bad = int(schedule.min()) if int(schedule.min()) < -1 else int(schedule.max())
        raise ValueError(f"actions schedule holds {bad}: entries must be -1 (policy) or in [0, {n})")
    return schedule.repeat_interleave(copies, dim=0)


def _allowed_mask(allowed, n, batch, copies, device):
    """list of ints / bool (n,) / bool (batch, n) -> bool (1 or batch*copies, n), or None."""
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
    return mask if mask.shape[0] == 1 else mask.repeat_interleave(copies, dim=0)


class _TokenChooser:
    """transformers' order: min_new_tokens (EOS barred), repetition penalty, then greedy or temperature,
    top-k, top-p and a sample."""

    def __init__(self, do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens, eos, generator,
                 processors=None):
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.do_sample = do_sample and temperature >= GREEDY_BELOW
        self.temperature, self.top_k, self.top_p = float(temperature), top_k or None, top_p
        self.penalty, self.min_new_tokens, self.eos, self.generator = (
            min(max(float(repetition_penalty), PENALTY_RANGE[0]), PENALTY_RANGE[1]), min_new_tokens, eos, generator)
        self.processors = processors
        self.scores = None  # the last step's scores after the processors (what stopping criteria see)

    def __call__(self, logits, step, seen, input_ids=None):
        """logits (rows, vocab) float32 (changed in place), seen (rows, vocab) bool or None, input_ids (rows,
        cur_len) the sequences so far (for ``processors``) -> tokens (rows,)."""
        if step < self.min_new_tokens and self.eos is not None:
            logits[:, self.eos] = float("-inf")
        if self.penalty != 1.0:
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(seen, penalised, logits)
        if self.processors is not None:
            logits = self.processors(input_ids, logits)
        self.scores = logits
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits / self.temperature
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


class _StopStrings:
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


# ----- transformers' generate conventions ----------------------------------------------------------------------
def _generate_settings(given: dict, generation_config, kwargs: dict) -> dict:
    """generate's settings: ``given`` keywords (None = not given) over ``kwargs`` (other transformers keywords)
    over ``generation_config``'s set fields over ``_GENERATE_DEFAULTS``.

    Raises TypeError naming every keyword or set field that generate cannot honour."""
    fields = {}
    if generation_config is not None:
        from transformers import GenerationConfig
        if not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers GenerationConfig, got "
                            f"{type(generation_config).__name__}")
        fields = {k: v for k, v in generation_config.to_dict().items()
                  if v is not None and not k.startswith("_") and k != "transformers_version"}
    settings = dict(_GENERATE_DEFAULTS)
    cannot = []
    for source, values in (("generation_config.", fields), ("", kwargs)):
        for name, value in values.items():
            if value is None:  # not given
                continue
            if name in _GENERATE_DEFAULTS:
                settings[name] = value
            elif name not in _NO_OP_GENERATE_VALUES:
                cannot.append(f"{source}{name}")
            elif not any(value is ok or (type(value) is type(ok) and value == ok)
                         for ok in _NO_OP_GENERATE_VALUES[name]):
                cannot.append(f"{source}{name}={value!r}")
    if cannot:
        raise TypeError(f"generate cannot honour {', '.join(cannot)} (bwarea runs one sampled or greedy beam "
                        "and returns sequences, or with return_dict_in_generate also actions)")
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def _new_token_counts(settings: dict, width: int) -> tuple[int, int]:
    """-> (max_new_tokens, min_new_tokens) for a prompt of ``width`` columns, from the length settings
    (max_length and min_length count the prompt, as in transformers)."""
    for name in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
        value = settings[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    max_new, max_length = settings["max_new_tokens"], settings["max_length"]
    if max_length is not None:
        if max_length < width:
            raise ValueError(f"max_length={max_length} counts the prompt, which already has {width} tokens: "
                             "give a larger max_length, or max_new_tokens")
        if max_new is not None and max_new != max_length - width:
            raise ValueError(f"max_new_tokens={max_new} and max_length={max_length} disagree for a prompt of "
                             f"{width} tokens (max_length counts the prompt): give one of them")
        max_new = max_length - width
    max_new = 20 if max_new is None else max_new
    min_new = settings["min_new_tokens"] or 0
    if settings["min_length"] is not None:
        min_new = max(min_new, settings["min_length"] - width)
    if min_new > max_new:
        name = "min_new_tokens" if settings["min_length"] is None else "min_new_tokens / min_length"
        raise ValueError(f"{name} asks for {min_new} new tokens, more than max_new_tokens={max_new}")
    return max_new, min_new


def _callable_list(value, name: str, kind: str):
    """A ``LogitsProcessorList`` / ``StoppingCriteriaList`` (or a plain list of callables, or one callable)
    -> a callable over the whole list, or None when empty."""
    if value is None:
        return None
    from transformers import LogitsProcessorList, StoppingCriteriaList
    cls = LogitsProcessorList if kind == "LogitsProcessorList" else StoppingCriteriaList
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = [type(item).__name__ for item in items if not callable(item)]
    if bad:
        raise TypeError(f"{name} must be a {kind} of callables, got {type(value).__name__} holding {bad}")
    return cls(items) if items else None


def _criteria_say_done(criteria, sequences, scores) -> torch.Tensor:
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


# ----- the mixin --------------------------------------------------------------------------------------------
class BWAreaGenerationMixin:
    """``generate``, ``fanout`` and ``lm_log_likelihood`` for ``BWAreaForCausalLM``."""

    def generate(self, input_ids=None, attention_mask=None, *, max_new_tokens=None, max_length=None,
                 min_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None,
                 repetition_penalty=None, eos_token_id=None, pad_token_id=None, num_return_sequences=None,
                 streamer=None, stop_strings=None, tokenizer=None, return_dict_in_generate=None,
                 generation_config=None, logits_processor=None, stopping_criteria=None, prompt_actions="inverse",
                 actions=None, allowed_actions=None, action_greedy=None, action_temperature=None,
                 step_callback=None, generator=None, **kwargs):
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

        ``streamer.put`` gets the prompt, then each step's tokens (rows,); ``step_callback(step, tokens,
        actions)`` runs after every step and stops generation by returning True. Each step appends its
        (rows, 1) actions to ``get_action_info()``.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (batch, seq)")
        settings = _generate_settings(
            dict(max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens,
                 do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 num_return_sequences=num_return_sequences, stop_strings=stop_strings,
                 return_dict_in_generate=return_dict_in_generate), generation_config, kwargs)
        processors = _callable_list(logits_processor, "logits_processor", "LogitsProcessorList")
        criteria = _callable_list(stopping_criteria, "stopping_criteria", "StoppingCriteriaList")
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, settings["bos_token_id"])
        batch, width = input_ids.shape
        max_new_tokens, min_new_tokens = _new_token_counts(settings, width)
        num_return_sequences = settings["num_return_sequences"]
        if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) \
                or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be an int >= 1, got {num_return_sequences!r}")
        if prompt_actions not in ("inverse", "policy"):
            raise ValueError(f"prompt_actions must be 'inverse' or 'policy', got {prompt_actions!r}")
        if width + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt length {width} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id, stop_strings, \
            return_dict_in_generate = (settings[k] for k in (
                "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
                "pad_token_id", "stop_strings", "return_dict_in_generate"))
        eos = _token_list(getattr(self.config, "eos_token_id", None) if eos_token_id is None else eos_token_id,
                          "eos_token_id")
        if pad_token_id is None:
            pad_token_id = getattr(self.config, "pad_token_id", None)
            pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        device, copies, steps = input_ids.device, num_return_sequences, max_new_tokens
        rows = batch * copies
        chooser = _ActionChooser(self, rows, steps, actions, allowed_actions, action_greedy, action_temperature,
                                 generator, batch, copies, device)
        sampler = _TokenChooser(do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens,
                                eos or None, generator, processors)
        stops = None if stop_strings is None else _StopStrings(stop_strings, tokenizer)
        if copies > 1:
            input_ids = input_ids.repeat_interleave(copies, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(copies, dim=0)

        with torch.no_grad():
            return self._generate(input_ids, attention_mask, steps, chooser, sampler, stops, eos, pad_token_id,
                                  streamer, step_callback, prompt_actions, return_dict_in_generate, criteria)

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

    def _generate(self, input_ids, attention_mask, steps, chooser, sampler, stops, eos, pad,
                  streamer, step_callback, prompt_actions, return_dict, criteria=None):
        rows, width = input_ids.shape
        device = input_ids.device
        sequences = torch.full((rows, width + steps), pad, dtype=torch.long, device=device)
        sequences[:, :width] = input_ids
        out_actions = torch.zeros(rows, steps, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, steps, device=device)
        entropy = torch.zeros(rows, steps, device=device)
        new_mask = torch.zeros(rows, steps, dtype=torch.bool, device=device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if steps == 0:
            prompt_acts = (self.infer_actions(input_ids, attention_mask)[0] if prompt_actions == "inverse"
                           else chooser.sample(self.policy_logits(input_ids, attention_mask)))[:, :-1]
            if streamer is not None:
                streamer.end()
            return self._finish(sequences, out_actions, logprobs, entropy, new_mask, prompt_acts, width, return_dict)

        run_policy = chooser.needs_policy or return_dict or prompt_actions == "policy"
        length = width + steps
        policy_caches = _caches(self, self.policy, rows, length) if run_policy else None
        world_caches = _caches(self, self.world_model, rows, length)
        joint_caches = _pair_caches(policy_caches, world_caches, _decode_pairs(self, device)) if run_policy else ()
        dtype = self._dtype()
        cos, sin, mask = self.positions_and_mask(attention_mask, rows, width, device, dtype)

        # Prefill: actions for the prompt, the policy's choice at T-1, the world model over the prompt.
        policy_logits = self.policy(input_ids, cos, sin, mask, policy_caches) if run_policy else None
        if prompt_actions == "inverse":
            prompt_acts = self.infer_actions(input_ids, attention_mask)[0][:, :-1]
        else:
            prompt_acts = chooser.sample(policy_logits[:, :-1])
        last = None if policy_logits is None else policy_logits[:, -1]
        action = chooser(last, 0)
        vectors = self.action_codebook(torch.cat([prompt_acts, action[:, None]], dim=1))
        hidden = self.world_model(input_ids, vectors, cos, sin, mask, world_caches)
        logits = self.world_model.lm_head(hidden[:, -1]).float()

        # Decode: positions of the fed tokens, and which cache columns each row may attend to.
        valid_len = width if attention_mask is None else attention_mask.sum(-1, keepdim=True)
        positions = valid_len + torch.arange(steps - 1, device=device).expand(rows, -1)
        step_cos, step_sin = self.rotary(positions, dtype)
        key_bias = None
        if attention_mask is not None:
            key_bias = torch.zeros(rows, 1, 1, length, dtype=dtype, device=device)
            key_bias[:, 0, 0, :width].masked_fill_(~attention_mask.bool(), float("-inf"))
        decoder = _Decoder(self, policy_caches, world_caches, step_cos, step_sin, key_bias, joint_caches)

        seen = None
        if sampler.penalty != 1.0:
            counts = torch.zeros(rows, self.config.vocab_size, dtype=torch.long, device=device)
            counts.scatter_add_(1, input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)
            seen = counts > 0
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        eos_ids = torch.tensor(eos, device=device) if eos else None
        stoppable = eos_ids is not None or stops is not None or criteria is not None
        # The sampler bars EOS before min_new_tokens: without stop strings or stopping criteria no row can finish
        # there, so those steps skip the per-step checks (a few ops and a device sync each).
        checks_from = 0 if stops is not None or criteria is not None else sampler.min_new_tokens
        info = self.action_info["action_idx"]
        done_steps = steps
        for step in range(steps):
            if step > 0:
                col = width + step - 1
                fed = sequences[:, col]
                policy_logits, hidden = decoder.lower_step(fed, step - 1, col, run_policy)
                action = chooser(policy_logits, step)
                logits = decoder.upper_step(hidden, action, step - 1, col)
            else:
                policy_logits = last
            token = sampler(logits, step, seen, sequences[:, :width + step])
            check = stoppable and step >= checks_from
            if check:
                token = token.masked_fill(finished, pad)
                new_mask[:, step] = ~finished
            else:
                new_mask[:, step] = True
            sequences[:, width + step] = token
            out_actions[:, step] = action
            info.append(action[:, None])
            if return_dict:
                logp = torch.log_softmax(policy_logits, dim=-1)
                logprobs[:, step] = logp.gather(1, action[:, None]).squeeze(1)
                entropy[:, step] = -(logp.exp() * logp).sum(-1)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if streamer is not None:
                streamer.put(token.cpu())
            stop = step_callback is not None and bool(step_callback(step, token, action))
            if check:
                if eos_ids is not None:
                    finished |= torch.isin(token, eos_ids)
                if stops is not None:
                    hit = stops.hits(sequences[:, width:width + step + 1].cpu(), (~finished).tolist())
                    finished[hit] = True
                if criteria is not None:
                    finished |= _criteria_say_done(criteria, sequences[:, :width + step + 1], sampler.scores)
                stop = stop or bool(finished.all())
            if stop:
                done_steps = step + 1
                break
        # Rows past a stop hold padding; the action record keeps one (rows, 1) entry per new column.
        for _ in range(done_steps, steps):
            info.append(torch.zeros(rows, 1, dtype=torch.long, device=device))
        if streamer is not None:
            streamer.end()
        return self._finish(sequences, out_actions, logprobs, entropy, new_mask, prompt_acts, width, return_dict)

    @staticmethod
    def _finish(sequences, actions, logprobs, entropy, new_mask, prompt_acts, width, return_dict):
        if not return_dict:
            return sequences
        return BWAreaGenerateOutput(sequences=sequences, actions=actions, action_logprobs=logprobs,
                                    action_entropy=entropy, new_token_mask=new_mask, prompt_actions=prompt_acts,
                                    prompt_length=width)

    def optimize_for_cpu_decoding(self):
        """Store the decode path's matrices (policy and world model) column-major, in place; returns the model.

        A decode step reads every weight once, and on CPU MKL streams a column-major weight ~1.4x faster for
        the one to three rows of a step (from four rows on, decoding multiplies with its own oneDNN-packed copy,
        whatever the layout; oneDNN's prompt products are as fast either way). Values, shapes and every forward
        pass stay the same, but the parameters become non-contiguous views: do this for inference (the CLI and
        server do), not for a model whose raw tensors other code expects contiguous
        (``safetensors.torch.save_file`` on a state dict, ``parameters_to_vector``); ``save_pretrained`` is
        unaffected. A no-op off CPU.
        """
        if self.world_model.lm_head.weight.device.type != "cpu":
            return self
        with torch.no_grad():
            for trunk in (self.world_model, self.policy):
                for name, p in trunk.named_parameters():
                    if p.dim() == 2 and "embed_tokens" not in name and p.is_contiguous() and p.shape[1] > 1:
                        p.data = p.data.t().contiguous().t()
        return self

    # ----- every action at once -----------------------------------------------------------------------------
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
        caches = _caches(self, w, batch, width, range(w.action_layer, len(w.layers)))
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
        return self._upper_half_over_actions(x, _shared_context(caches, width - 1, 1), last_cos, last_sin, mask)

    def _world_at_each_position(self, lower, caches, cos, sin, valid, vectors, copies, memo=None):
        """The world model at every position t under its own action, with the context before t understood.

        lower, caches, cos, sin, valid: ``_understood``'s; vectors (batch * copies, T or 1, codebook_dim): the
        action vector of each query, ``copies`` query rows per batch row (batch-major). -> logits
        (batch * copies, T, vocab) float32: row r at t is the world model's next-token logits after x_<=t, with
        the inverse-dynamics actions at s < t (the cached context) and vectors[r, t] at t. Nothing at t reads a
        token after t: the inverse-dynamics action at s explains token s+1 <= t. ``memo`` (a dict) keeps what
        calls with the same ``copies`` share (masks, rotary, the context's keys/values per query row).
        """
        shared = None if memo is None else memo.get(copies)
        if shared is None:
            batch, width = valid.shape
            device = valid.device
            # Position t's query sees the valid context strictly before t, and its own key (its action at t).
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril(-1)
            eye = torch.eye(width, dtype=torch.bool, device=device).expand(batch, width, width)
            mask = torch.cat([causal & valid[:, None, :], eye], dim=2)[:, None]
            # Unpadded rows share one mask; SDPA broadcasts it over the query rows.
            mask = mask[:1] if bool(valid.all()) else mask.repeat_interleave(copies, dim=0)
            shared = (_shared_context(caches, width, copies), cos.repeat_interleave(copies, dim=0),
                      sin.repeat_interleave(copies, dim=0), mask)
            if memo is not None:
                memo[copies] = shared
        x = self.world_model.inject(lower.repeat_interleave(copies, dim=0), vectors)
        return self._upper_half_over_actions(x, *shared)

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
        vectors = self.action_codebook(self._check_actions(action_idx, input_ids))
        return self._world_at_each_position(*understood, vectors, 1)

    def _mixture(self, input_ids, attention_mask, actions_per_chunk, targets=None):
        """The one implementation of BWArea's next-token mixture (``lm_logprobs``, ``lm_log_likelihood``, and
        ``forward`` without actions).

        -> (log p (batch, T, vocab) or, with ``targets`` (batch, T), log p at the targets (batch, T); the
        policy's log pi (batch, T, num_actions)). The actions stream through in chunks under a running
        logsumexp, so besides the result only one chunk's (batch, chunk, T, vocab) logits are alive. Gathering
        the targets before the sum over actions gives the same numbers and keeps the autograd graph small
        (behaviour cloning back-propagates into log pi through it).
        """
        if actions_per_chunk is not None and (isinstance(actions_per_chunk, bool) or not isinstance(
                actions_per_chunk, int) or actions_per_chunk < 1):
            raise ValueError(f"actions_per_chunk must be a positive int or None, got {actions_per_chunk!r}")
        lower, caches, cos, sin, valid = self._understood(input_ids, attention_mask)
        batch, width = input_ids.shape
        n, vocab = self.config.num_actions, self.config.vocab_size
        log_pi = torch.log_softmax(self.policy_logits(input_ids, attention_mask), dim=-1)  # (batch, T, n)
        # Default: a chunk's logits hold about 4M floats (16 MB), or one action when the input alone is larger.
        # Bigger chunks are no faster on CPU (measured, benchmarks/bench_lm_view.py): they fall out of cache.
        chunk = actions_per_chunk or max(1, min(n, (4 << 20) // max(1, batch * width * vocab)))
        total, memo = None, {}
        for start in range(0, n, chunk):
            acts = torch.arange(start, min(n, start + chunk), device=input_ids.device)
            c = len(acts)
            # (batch * c, 1, dim), batch-major with the actions inner, as _world_at_each_position's rows are.
            vectors = self.action_codebook(acts).repeat(batch, 1)[:, None]
            logits = self._world_at_each_position(lower, caches, cos, sin, valid, vectors, c, memo)
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

    def lm_log_likelihood(self, input_ids, attention_mask=None, actions_per_chunk=None):
        """Exact log p(x_{t+1} | x_<=t) of BWArea as a language model: ``lm_logprobs`` at the next tokens.

        input_ids, attention_mask (batch, T), padded on the left or the right -> (batch, T-1) float32, entry t =
        logsumexp_a [log pi(a | x_<=t) + log p_world(x_{t+1} | x_<=t, inverse-dynamics actions before t, a)]
        = ``lm_logprobs(...)[:, t, x_{t+1}]``. Entries whose target or context token is padding are 0. Same
        computation as ``lm_logprobs``, with the targets picked before the sum over actions, so gradients into
        the policy stay cheap. Wrap in ``torch.no_grad()`` for evaluation.
        """
        if torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[1] > 0:
            targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).long()  # the last column is unused
        else:
            targets = None  # _understood names what is wrong with input_ids
        ll = self._mixture(input_ids, attention_mask, actions_per_chunk, targets)[0][:, :-1]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return ll.masked_fill(~(valid[:, 1:] & valid[:, :-1]), 0.0)


def _shared_context(caches, prefix: int, copies: int) -> list:
    """``_understood``'s upper-block caches -> per block a PrefixKVCache of the first ``prefix`` positions for
    ``copies`` query rows per batch row (None for blocks below the action)."""
    return [None if c is None else PrefixKVCache(c.keys[:, :, :prefix], c.values[:, :, :prefix], copies)
            for c in caches]


def _logsumexp_over(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp(x, dim); x is used as scratch space when it carries no gradient (one buffer, not two)."""
    if x.requires_grad:
        return torch.logsumexp(x, dim)
    top = x.amax(dim, keepdim=True)
    return x.sub_(top).exp_().sum(dim).log_().add_(top.squeeze(dim))


def _token_list(value, name) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value.tolist() if torch.is_tensor(value) else value)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    return values
