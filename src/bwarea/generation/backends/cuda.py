"""The CUDA decode step: the eager step over static full-length caches, captured into CUDA graphs and replayed.

At batch 1 a decode step is hundreds of small kernels; launched one by one from Python, the launches, not the
weights, set the pace. So each half of the step (``lower``, ``upper``) is captured once per shape as a CUDA graph
and replayed. What makes the step capturable:

* every cache holds its full length (``StaticKVCache.full_keys``) and the step writes its column with
  ``index_copy_`` at a device index, attending to every column under a mask (prompt padding and the columns
  after the step's are masked): no shape depends on the step;
* inputs (tokens, positions, column, actions) are copied into fixed buffers before each replay, and outputs come
  back in fixed buffers, read before the next replay;
* shapes are bucketed (rows to a power of two, the cache length to a multiple of ``LENGTH_BUCKET``), and the
  captured state (caches, buffers, graphs) is kept per model and reused by the next generation of that bucket,
  so a server or an RL loop captures once. Spare rows decode junk that is never read.

``cuda-compile`` runs the same step through ``torch.compile`` before capturing it, which fuses the elementwise
work (norms, rotary, SiLU) into fewer kernels; the first generation of each bucket pays the compile.
The prefill runs the model's own blocks (SDPA) into the same caches.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ..cache import make_caches
from . import DecodeStep

LENGTH_BUCKET = 256

# model -> the last captured _GraphState: one per model, so holding it costs one bucket's caches at most.
_STATES = weakref.WeakKeyDictionary()


def _bucket_rows(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


class _GraphState:
    """Caches, fixed input/output buffers and the two captured graphs for one (model, rows, length) bucket."""

    def __init__(self, model, rows: int, length: int, run_policy: bool, compiled, capture: bool):
        self.model, self.rows, self.length, self.run_policy, self.capture = model, rows, length, run_policy, capture
        w = model.world_model
        device, dtype = w.embed_tokens.weight.device, w.embed_tokens.weight.dtype
        self.key = _state_key(model, rows, length, run_policy, compiled, capture)
        self.policy_caches = make_caches(model, model.policy, rows, length) if run_policy else None
        self.world_caches = make_caches(model, w, rows, length)
        for c in (self.policy_caches or []) + self.world_caches:
            for t in (c.full_keys, c.full_values):
                torch._dynamo.mark_static_address(t)  # compiled steps read the buffers in place
        long = dict(dtype=torch.long, device=device)
        self.tokens, self.positions, self.actions = (torch.zeros(rows, **long) for _ in range(3))
        self.col, self.columns = torch.zeros(1, **long), torch.arange(length, **long)
        self.valid_len = torch.zeros(rows, **long)
        self.key_valid = torch.ones(rows, length, dtype=torch.bool, device=device)
        self.hidden = torch.zeros(rows, 1, model.config.hidden_size, dtype=dtype, device=device)
        self.policy_logits = torch.zeros(rows, model.config.num_actions, device=device)
        self.logits = torch.zeros(rows, model.config.vocab_size, device=device)
        lower, upper = self._lower, self._upper
        if compiled:
            # fullgraph: a graph break would silently cost the fusion; better an error naming it.
            options = {} if compiled is True else {"backend": compiled}
            lower, upper = (torch.compile(f, dynamic=False, fullgraph=True, **options) for f in (lower, upper))
        self.bodies = {"lower": lower, "upper": upper}
        self.graphs, self.pool = {}, torch.cuda.graph_pool_handle() if capture else None

    def _inputs(self):
        cos, sin = self.model.rotary(self.positions[:, None], self.hidden.dtype)
        mask = (self.key_valid & (self.columns <= self.col))[:, None, None, :]
        return cos, sin, mask

    def _lower(self):
        cos, sin, mask = self._inputs()
        m, ids = self.model, self.tokens[:, None]
        w = m.world_model
        writes = [c.at(self.col, full=True) for c in self.world_caches[:w.action_layer]]
        self.hidden.copy_(w.run(w.embed_tokens(ids), cos, sin, mask, writes, 0, w.action_layer))
        if self.run_policy:
            writes = [c.at(self.col, full=True) for c in self.policy_caches]
            self.policy_logits.copy_(m.policy(ids, cos, sin, mask, writes)[:, 0])

    def _upper(self):
        cos, sin, mask = self._inputs()
        m = self.model
        w = m.world_model
        x = w.inject(self.hidden, m.action_codebook(self.actions)[:, None])
        writes = [None] * w.action_layer + [c.at(self.col, full=True) for c in self.world_caches[w.action_layer:]]
        self.logits.copy_(w.lm_head(w.norm(w.run(x, cos, sin, mask, writes, w.action_layer))[:, 0]).float())

    def replay(self, half: str):
        if not self.capture:
            self.bodies[half]()
            return
        graph = self.graphs.get(half)
        if graph is None:
            body = self.bodies[half]
            # Warm-up off the capturing stream (cuBLAS workspaces, a compile), then capture. Both write the same
            # values to the same cache column as the replay that follows: the inputs are already in place.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    body()
            except RuntimeError as err:
                # A torch or driver that cannot capture this step still decodes, uncaptured, and says so once.
                warnings.warn(f"bwarea: capturing the {half} decode step as a CUDA graph failed ({err}); "
                              "decoding without CUDA graphs (pass backend='eager' to silence this)", RuntimeWarning)
                self.capture = False
                body()
                return
            self.graphs[half] = graph
        graph.replay()


def _state_key(model, rows, length, run_policy, compiled, capture):
    # Parameters moved or re-created (model.to, a new dtype) make new addresses: the captured graphs would read
    # the old ones. In-place updates (an optimiser step) keep addresses, and the graphs see the new values.
    params = (model.world_model.lm_head.weight, model.policy.head.weight, model.world_model.embed_tokens.weight)
    # Buffers made under inference_mode cannot be written outside it (and a generate may run in either).
    return (rows, length, run_policy, compiled, capture, torch.is_inference_mode_enabled(),
            tuple((p.data_ptr(), p.dtype) for p in params))


class StaticStep(DecodeStep):
    """The capturable step run as it is, on any device: what ``cuda`` captures, testable without a GPU."""

    name = "static"
    compiled = False  # True: torch.compile (inductor); a string: that torch.compile backend
    capture = False

    def __init__(self, model, rows, width, steps, attention_mask, run_policy):
        bucket_rows = _bucket_rows(rows)
        length = -(-(width + steps) // LENGTH_BUCKET) * LENGTH_BUCKET
        key = _state_key(model, bucket_rows, length, run_policy, self.compiled, self.capture)
        state = _STATES.get(model)
        if state is None or state.key != key:
            _STATES.pop(model, None)  # free the old bucket's caches before allocating the new one's
            state = _GraphState(model, bucket_rows, length, run_policy, self.compiled, self.capture)
            _STATES[model] = state
        self.state, self.rows, self.width = state, rows, width
        for caches in (state.policy_caches or [], state.world_caches):
            for c in caches:
                c.keys, c.values, c.length = c.full_keys[:rows], c.full_values[:rows], 0
        self.policy_caches = state.policy_caches
        self.world_caches = state.world_caches
        state.key_valid.fill_(True)
        if attention_mask is not None:
            state.key_valid[:rows, :width] = attention_mask.bool()
        state.valid_len.fill_(width)
        if attention_mask is not None:
            state.valid_len[:rows] = attention_mask.sum(-1)
        state.tokens.zero_()
        state.actions.zero_()

    def lower(self, tokens, i, policy=True):
        s = self.state
        s.tokens[:self.rows] = tokens
        torch.add(s.valid_len, i, out=s.positions)
        s.col.fill_(self.width + i)
        s.replay("lower")
        return (s.policy_logits[:self.rows] if policy else None), s.hidden[:self.rows]

    def upper(self, hidden, actions, i):
        s = self.state
        if hidden.data_ptr() != s.hidden.data_ptr():
            s.hidden[:self.rows] = hidden
        s.actions[:self.rows] = actions
        s.replay("upper")
        return s.logits[:self.rows]


class CudaGraphStep(StaticStep):
    name = "cuda"
    capture = True


class CompiledCudaGraphStep(CudaGraphStep):
    name = "cuda-compile"
    compiled = True
