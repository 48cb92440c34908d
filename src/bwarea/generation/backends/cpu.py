"""The CPU decode step: the model's block maths flattened into tensor ops, with weights laid out for CPU products.

At the model sizes a CPU decodes, module calls and per-step Python objects cost more than the matrix products,
so a step here is a flat list of tensor ops over (rows, hidden) rows. It is the same maths as ``Block.forward``
(checked against the eager backend by tests/test_backends.py). What makes it fast on a CPU:

* products of a few rows run as a bmm over ``torch.get_num_threads()`` column blocks of each weight (all cores
  stream the weight; a skinny mm runs on one), or, from ``PACKED_MIN_ROWS`` rows in float32, through
  oneDNN with the weights packed once (``kernels.pack``);
* the policy's and the world model's blocks below the action read only the fed token: the first pairs run
  stacked, one product for both (``decode_pairs``);
* attention is two bmms and a softmax (SDPA's CPU kernel costs more for the few query rows of a step);
* ``StepThreads`` runs a step on one thread while other work holds the cores.

The derived weights (stacked pairs, packed copies) are this backend's, cached per model in a weak dictionary and
rebuilt when a parameter changes (an optimiser step bumps its version); ``prepare`` lays the model's decode
matrices out column-major for the bmm path. None of it touches how the model trains.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from ... import kernels
from ..cache import make_caches
from . import DecodeStep, decode_positions
from .threads import StepThreads

# Pairing copies the paired blocks' weights (``_stacked_pair_weights``): worth it where per-op overhead rules the
# step, i.e. small models; above this many bytes of paired weights the decode step runs the blocks one by one.
PAIRED_BYTES_LIMIT = 256 * 2**20
# A decode step of at least this many rows multiplies with weights packed for oneDNN (``kernels.pack``, a copy of
# the decode matrices, kept up to this many bytes) where oneDNN is available; at 1-2 rows the per-call cost of
# oneDNN loses to the bmm over column blocks (benchmarks/bench_kernels.py measures both).
PACKED_MIN_ROWS = 4
PACKED_BYTES_LIMIT = 512 * 2**20
# bf16 / float16 weights: oneDNN's packed layout is what lets the CPU's bf16 dot-product instructions stream the
# weight (unpacked, torch's kernels convert as they go and run several times slower at a step's few rows), so
# they are packed from one row on, up to this many bytes: a copy of the decode matrices (3.8 GB at the released
# 2.7B shape). BWAREA_CPU_PACK_LIMIT_MB sets another limit (0: never pack).
HALF_PACKED_BYTES_LIMIT = int(float(os.environ.get("BWAREA_CPU_PACK_LIMIT_MB", 8192)) * 2**20)


def decode_pairs(model, device) -> int:
    """How many leading (policy block, world-model block) pairs the CPU decode step runs as one stacked block.

    Both blocks of a pair read only the fed token (the action enters the world model at ``action_layer``), so
    they run side by side: every product is one bmm over the two weights (a thread each), or two oneDNN
    products, and every other op runs once for both. That halves the op count of those layers, which is what a
    small model's step costs on CPU."""
    if device.type != "cpu":
        return 0
    pairs = min(model.world_model.action_layer, len(model.policy.layers))
    size = sum(p.numel() * p.element_size() for i in range(pairs) for p in model.policy.layers[i].parameters())
    return pairs if 0 < 2 * size <= PAIRED_BYTES_LIMIT else 0


def _pair_caches(policy_caches, world_caches, pairs: int) -> list:
    """Put the first ``pairs`` policy and world-model caches in one buffer each for keys and values,
    (2, batch, kv_heads, max_len, head_dim), index 0 the policy's -> those (keys, values) buffers per pair."""
    joint = []
    for p, w in zip(policy_caches[:pairs], world_caches[:pairs]):
        keys, values = p.keys.new_zeros((2, *p.keys.shape)), p.values.new_zeros((2, *p.values.shape))
        p.keys, w.keys, p.values, w.values = keys[0], keys[1], values[0], values[1]
        joint.append((keys, values))
    return joint


# model -> {name: (key, derived weights)}: the backend's copies, dropped with the model (no attribute on it).
_DERIVED = weakref.WeakKeyDictionary()


def _derived_weights(model, name: str, sources, build):
    """``build()`` (run without autograd), cached for ``model`` under ``name`` until a tensor of ``sources``
    changes storage or is updated in place: an optimiser step bumps its version (RL updates the policy between
    rollouts). Parameters made under inference_mode carry no version; they cannot be updated outside it."""
    key = tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in sources)
    cached = _DERIVED.setdefault(model, {})
    if name in cached and cached[name][0] == key:
        return cached[name][1]
    with torch.no_grad():
        value = build()
    cached[name] = (key, value)
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


def packed_weights(model, device, rows: int) -> dict | None:
    """``_decode_matrices`` packed for oneDNN where a decode step of ``rows`` rows multiplies with them, else
    None: float32 from ``PACKED_MIN_ROWS`` rows up to ``PACKED_BYTES_LIMIT``; bf16 / float16 from one row up to
    ``HALF_PACKED_BYTES_LIMIT``; on CPU, where oneDNN packs that dtype. Cached per model like
    ``_stacked_pair_weights``, per group: RL updates only the policy, and the world model's packed copy stays."""
    dtype = model.world_model.lm_head.weight.dtype
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type != "cpu" or (dtype != torch.float32 and not half) or (not half and rows < PACKED_MIN_ROWS):
        return None
    groups = _decode_matrices(model)
    size = sum(t.numel() * t.element_size() for mats in groups.values() for t in mats.values())
    if size > (HALF_PACKED_BYTES_LIMIT if half else PACKED_BYTES_LIMIT) or not kernels.packs(dtype):
        return None
    packed = {}
    for name, mats in groups.items():
        packed |= _derived_weights(model, f"_decode_packed_{name}", list(mats.values()),
                                   lambda mats=mats: {k: kernels.pack(w) for k, w in mats.items()})
    return packed


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm without the module call; in float32 one fused op (the same math)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class _Decoder:
    """One position through the policy and the world model, over their StaticKVCaches.

    ``Block.forward`` for a single position with the weights read directly. Rotary is applied to q and k together
    as x*cos + roll(x, d/2)*sin_signed (that is rotate_half), the softmax scale rides in the query rows of those
    tables, and the action injection splits W_dyn [h ; U e_a] into W_h h + (W_a U e_a), the second term
    tabulated once per action. Products of the few rows run as a bmm over ``torch.get_num_threads()`` column
    blocks of each weight (views, no copies), or through oneDNN-packed copies from ``PACKED_MIN_ROWS`` rows in
    float32; the leading (policy, world model) block pairs run stacked (``_pair_block``).
    """

    def __init__(self, model, policy_caches, world_caches, cos, sin, key_bias, joint_caches=()):
        """cos, sin (rows, 1, steps, head_dim): rotary of the fed positions; key_bias (rows, 1, 1, cache length)
        0 / -inf for the cache columns each row may / may not attend to (left padding), or None; joint_caches:
        ``_pair_caches``' buffers, one per leading block pair to run stacked."""
        c = model.config
        self.n_heads, self.n_kv, self.head_dim, self.eps = (c.num_attention_heads, c.num_key_value_heads,
                                                             c.head_dim, c.rms_norm_eps)
        self.blocks = torch.get_num_threads()
        self.threads = StepThreads(self.blocks)  # one thread per step where that is faster now
        world, policy = model.world_model, model.policy
        # oneDNN-packed weights (looked up by parameter) and their product, or column-block views and the bmm.
        self.packed = packed_weights(model, cos.device, cos.shape[0])
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
        self.scale = self.head_dim ** -0.5
        # The plain path folds the softmax scale into the query heads' rows of the tables (one op less a block).
        heads = torch.ones(self.n_heads + self.n_kv, 1, 1, dtype=cos.dtype, device=cos.device)
        heads[:self.n_heads] = self.scale
        self.cos = (cos * heads).permute(2, 0, 1, 3).unbind(0)
        self.sin = (sin * sign * heads).permute(2, 0, 1, 3).unbind(0)
        self.key_bias = key_bias
        if key_bias is not None:  # as (rows * kv_heads, 1, keys), for the bmm scores
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
        # queries (b, heads, d), already scaled: as (b * kv_heads, group, d) rows of a bmm
        queries = qk[:, :nh].reshape(b * nkv, -1, self.head_dim)
        scores = torch.bmm(queries, keys_3d[:, :col + 1].transpose(1, 2))
        if self.key_bias is not None:
            scores += self.key_bias[..., :col + 1]
        y = torch.bmm(scores.softmax(-1), values_3d[:, :col + 1])
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


class CpuStep(DecodeStep):
    """The CPU backend's DecodeStep: StaticKVCaches (the leading policy/world pairs in joint buffers) and a
    ``_Decoder`` over them."""

    name = "cpu"

    def __init__(self, model, rows, width, steps, attention_mask, run_policy):
        length, device = width + steps, model.world_model.embed_tokens.weight.device
        dtype = model.world_model.embed_tokens.weight.dtype
        self.width = width
        self.policy_caches = make_caches(model, model.policy, rows, length) if run_policy else None
        self.world_caches = make_caches(model, model.world_model, rows, length)
        joint = _pair_caches(self.policy_caches, self.world_caches, decode_pairs(model, device)) if run_policy \
            else ()
        cos, sin = model.rotary(decode_positions(attention_mask, rows, width, steps, device), dtype)
        key_bias = None
        if attention_mask is not None:
            key_bias = torch.zeros(rows, 1, 1, length, dtype=dtype, device=device)
            key_bias[:, 0, 0, :width].masked_fill_(~attention_mask.bool(), float("-inf"))
        self.decoder = _Decoder(model, self.policy_caches, self.world_caches, cos, sin, key_bias, joint)

    def lower(self, tokens, i, policy=True):
        return self.decoder.lower_step(tokens, i, self.width + i, policy)

    def upper(self, hidden, actions, i):
        return self.decoder.upper_step(hidden, actions, i, self.width + i)


def prepare(model):
    """Store the decode path's float32 matrices (policy and world model) column-major, in place; returns the model.

    A decode step reads every weight once, and MKL streams a column-major float32 weight faster for the one to
    three rows of a step (from ``PACKED_MIN_ROWS`` rows on, decoding multiplies with its own oneDNN-packed copy,
    whatever the layout). bf16 and float16 weights stay row-major: their CPU kernels read a column-major weight
    an order of magnitude slower (docs/performance.md). Values, shapes and every forward pass stay the same, but the parameters become non-contiguous
    views: do this for inference (the CLI and server do), not for a model whose raw tensors other code expects
    contiguous (``safetensors.torch.save_file`` on a state dict, ``parameters_to_vector``); ``save_pretrained``
    is unaffected. A no-op off CPU.
    """
    if model.world_model.lm_head.weight.device.type != "cpu":
        return model
    with torch.no_grad():
        for trunk in (model.world_model, model.policy):
            for name, p in trunk.named_parameters():
                if p.dim() == 2 and p.dtype == torch.float32 and "embed_tokens" not in name and p.is_contiguous() \
                        and p.shape[1] > 1:
                    p.data = p.data.t().contiguous().t()
    return model
