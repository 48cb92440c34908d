"""The model worker behind the server: one thread owns the model, requests wait in a bounded queue.

Why one thread: a model on one device runs one forward at a time anyway, and the model keeps per-call state
(``get_action_info``). So the event loop never runs the model; it puts a job on the queue and awaits events on
the job's own asyncio queue. The worker takes a job and, while the next waiting jobs sample the same way,
takes those too (up to ``max_batch`` rows) and generates them as one left-padded batch. Events are handed to
the event loop with ``call_soon_threadsafe`` onto unbounded per-request queues, so a client that reads slowly
only delays itself.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from dataclasses import dataclass, field

import torch

from .views import TextStream


@dataclass
class Limits:
    """What one request may ask for, and how much waits. Exceeding a request limit is a 400; a full queue, a 503."""

    max_tokens: int = 256              # new tokens per completion
    max_prompt_tokens: int | None = None  # None: the model's context minus one new token
    max_n: int = 8                     # completions per prompt
    max_batch: int = 8                 # rows (prompts x n) generated together
    queue_size: int = 64               # requests waiting for the worker
    max_top_k: int = 20                # tokens listed per action by /v1/fanout, and logprobs alternatives


class Overloaded(Exception):
    """The request queue is full."""


@dataclass
class Completion:
    """One validated completion request: token-id prompts and how to sample them."""

    prompts: list[list[int]]
    max_tokens: int = 16
    n: int = 1
    stop: list[str] = field(default_factory=list)
    temperature: float = 1.0           # 0: argmax tokens
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    actions: int | list[int] | None = None
    allowed_actions: list[int] | None = None
    action_greedy: bool = False
    action_temperature: float = 1.0
    logprobs: int | None = None        # alternatives per token; None: no logprobs
    stream: bool = False

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def batch_key(self):
        """Requests with equal keys can share a batch; a seeded request runs alone so its samples are its own."""
        if self.seed is not None:
            return None
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.action_greedy,
                self.action_temperature)


class Ticket:
    """A submitted job. The worker calls ``send``; the event loop reads ``(kind, payload)`` from ``events``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the request handler when its client goes away

    def send(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Job:
    ticket: Ticket
    request: Completion | None = None
    fn: object = None  # a call: fn() -> result, run on the worker


@dataclass
class _Row:
    """One sequence of a batch: a (prompt, sample) pair of some request."""

    job: _Job
    index: int
    prompt: list[int]
    max_tokens: int
    stream: TextStream
    token_ids: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish: str | None = None


class Engine:
    """Owns the model and its worker thread. ``submit`` and ``call`` are used from the event loop."""

    def __init__(self, model, tokenizer, limits: Limits | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or Limits()
        self.lock = threading.Lock()  # held while the worker runs the model; hold it to use the model elsewhere
        self._queue: queue.Queue = queue.Queue(maxsize=self.limits.queue_size)
        self._pending: collections.deque = collections.deque()  # taken from the queue but not batchable
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "rejected": 0}

    # ----- the event loop side -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closing.clear()
            self._thread = threading.Thread(target=self._work, name="bwarea-model-worker", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _put(self, job: _Job) -> Ticket:
        self.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats["rejected"] += 1
            raise Overloaded(f"the server is busy: {self.limits.queue_size} requests are waiting; retry later")
        self.stats["requests"] += 1
        return job.ticket

    def submit(self, request: Completion) -> Ticket:
        """Queue a completion. Events: ("token", (index, shown_text, token_id, action, piece)) while streaming,
        then ("done", [choice dict per row]) or ("error", exception)."""
        return self._put(_Job(Ticket(asyncio.get_running_loop()), request=request))

    async def call(self, fn):
        """Run fn() on the worker (in turn with generation) and return its result; its exceptions re-raise here."""
        ticket = self._put(_Job(Ticket(asyncio.get_running_loop()), fn=fn))
        try:
            kind, payload = await ticket.events.get()
        finally:
            ticket.cancel()
        if kind == "error":
            raise payload
        return payload

    def status(self) -> dict:
        busy = self.lock.locked()
        return {"queued": self._queue.qsize() + len(self._pending), "busy": busy, **self.stats}

    # ----- the worker thread -------------------------------------------------------------------------
    def _next(self) -> _Job | None:
        if self._pending:
            return self._pending.popleft()
        try:
            return self._queue.get(timeout=0.2)  # wake up now and then to notice close()
        except queue.Empty:
            return None

    def _work(self) -> None:
        while not self._closing.is_set():
            job = self._next()
            if job is None or job.ticket.cancelled:
                continue
            if job.fn is not None:
                self._run_call(job)
                continue
            batch, rows, key = [job], job.request.rows, job.request.batch_key()
            while key is not None and rows < self.limits.max_batch:
                try:
                    other = self._queue.get_nowait()
                except queue.Empty:
                    break
                fits = (other.fn is None and other.request.batch_key() == key
                        and rows + other.request.rows <= self.limits.max_batch)
                if not fits:
                    self._pending.append(other)  # first in line for the next batch
                    break
                if not other.ticket.cancelled:
                    batch.append(other)
                    rows += other.request.rows
            self._run_batch(batch)

    def _run_call(self, job: _Job) -> None:
        try:
            with self.lock, torch.inference_mode():
                result = job.fn()
        except Exception as err:  # handed to the request, which turns it into an HTTP error
            job.ticket.send("error", err)
        else:
            job.ticket.send("result", result)

    def _run_batch(self, batch: list[_Job]) -> None:
        rows = [_Row(job, p * job.request.n + j, prompt, job.request.max_tokens,
                     TextStream(self.tokenizer, prompt, job.request.stop))
                for job in batch for p, prompt in enumerate(job.request.prompts) for j in range(job.request.n)]
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        try:
            with self.lock, torch.inference_mode():
                out = self._generate(batch[0].request, rows)
                action_logprobs = out.action_logprobs.tolist()
                wanted = [r for r in rows if r.job.request.logprobs is not None and r.token_ids]
                token_logprobs = self._token_logprobs(wanted) if wanted else {}
        except Exception as err:
            for job in batch:
                job.ticket.send("error", err)
            return
        finally:
            self.model.reset_action_info()  # the worker lives long: don't let the action record grow
        for job in batch:
            choices = []
            for i, row in enumerate(rows):
                if row.job is not job:
                    continue
                tail = row.stream.flush()
                if row.finish is None:
                    row.finish = "length"
                    if tail and job.request.stream:
                        job.ticket.send("token", (row.index, tail, None, None, ""))
                count = len(row.token_ids)
                choices.append({
                    "index": row.index, "text": row.stream.text, "finish_reason": row.finish,
                    "token_ids": row.token_ids, "tokens": row.pieces, "actions": row.actions,
                    "action_logprobs": action_logprobs[i][:count], "prompt_tokens": len(row.prompt),
                    "logprobs": token_logprobs.get(id(row))})
            job.ticket.send("done", sorted(choices, key=lambda c: c["index"]))

    def _generate(self, request: Completion, rows: list[_Row]):
        """Generate every row in one left-padded batch; rows stop on EOS, a stop string or their max_tokens."""
        model, device = self.model, self.model.device
        pad = self.tokenizer.pad_token_id
        width = max(len(r.prompt) for r in rows)
        steps = max(r.max_tokens for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[b, width - len(r.prompt):] = 1
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=device).manual_seed(request.seed)
        eos = model.config.eos_token_id

        def on_step(step, tokens, actions):
            tokens, actions = tokens.tolist(), actions.tolist()
            for b, r in enumerate(rows):
                if r.finish is not None:
                    continue
                if r.job.ticket.cancelled:
                    r.finish = "cancelled"
                    continue
                token, action = tokens[b], actions[b]
                r.token_ids.append(token)
                r.actions.append(action)
                if token == eos:
                    piece, shown, r.finish = "", "", "stop"
                else:
                    piece, shown = r.stream.push(token)
                    if r.stream.stopped:
                        r.finish = "stop"
                    elif len(r.token_ids) >= r.max_tokens:
                        r.finish = "length"
                r.pieces.append(piece)
                if r.finish is not None:
                    shown += r.stream.flush()
                if r.job.request.stream:
                    r.job.ticket.send("token", (r.index, shown, token, action, piece))
            return all(r.finish is not None for r in rows)

        return model.generate(
            ids.to(device), mask.to(device), max_new_tokens=steps, do_sample=request.temperature > 0,
            temperature=request.temperature if request.temperature > 0 else 1.0, top_p=request.top_p,
            top_k=request.top_k, repetition_penalty=request.repetition_penalty, pad_token_id=pad,
            actions=self._action_schedule(rows, steps), allowed_actions=self._allowed_mask(rows),
            action_greedy=request.action_greedy, action_temperature=request.action_temperature,
            step_callback=on_step, generator=generator, return_dict_in_generate=True)

    def _action_schedule(self, rows: list[_Row], steps: int) -> torch.Tensor | None:
        """(B, steps) actions, -1 where the policy chooses; None when every row leaves it to the policy."""
        if all(r.job.request.actions is None for r in rows):
            return None
        schedule = torch.full((len(rows), steps), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            actions = r.job.request.actions
            if isinstance(actions, int):
                schedule[b] = actions
            elif actions:
                schedule[b, :len(actions)] = torch.tensor(actions)
        return schedule.to(self.model.device)

    def _allowed_mask(self, rows: list[_Row]) -> torch.Tensor | None:
        """(B, num_actions) bool, True where the policy may choose; None when no row restricts it."""
        if all(r.job.request.allowed_actions is None for r in rows):
            return None
        mask = torch.ones((len(rows), self.model.config.num_actions), dtype=torch.bool)
        for b, r in enumerate(rows):
            if r.job.request.allowed_actions is not None:
                mask[b] = False
                mask[b, r.job.request.allowed_actions] = True
        return mask.to(self.model.device)

    def _token_logprobs(self, rows: list[_Row]) -> dict[int, dict]:
        """OpenAI ``logprobs`` for finished rows: log p_world(token | text before it, its action), at temperature 1.

        One batched world-model pass over prompt + generated tokens, with the inverse-dynamics actions on the
        prompt and each generated token's own action, which is exactly what the tokens were sampled from.
        """
        model, pad = self.model, self.tokenizer.pad_token_id
        seqs = [r.prompt + r.token_ids for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, width - len(s):], mask[b, width - len(s):] = torch.tensor(s), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        inverse, _, _ = model.infer_actions(ids, mask)
        actions = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            start, t = width - len(seqs[b]), len(r.prompt)
            actions[b, start:start + t - 1] = inverse[b, start:start + t - 1]
            actions[b, start + t - 1:start + t - 1 + len(r.actions)] = torch.tensor(r.actions)
        logp = torch.log_softmax(model(ids, mask, action_idx=actions).logits.float(), dim=-1)
        out = {}
        for b, r in enumerate(rows):
            start, t, g = width - len(seqs[b]), len(r.prompt), len(r.token_ids)
            lp = logp[b, start + t - 1:start + t - 1 + g]                            # (g, V)
            chosen = lp.gather(-1, torch.tensor(r.token_ids, device=lp.device)[:, None])[:, 0].tolist()
            k = r.job.request.logprobs
            top = []
            if k:
                values, indices = lp.topk(k, dim=-1)
                for j in range(g):
                    context, alternatives = r.prompt + r.token_ids[:j], {}
                    for v, i in zip(values[j].tolist(), indices[j].tolist()):
                        # Tokens that write the same text share a key (the OpenAI format); keep the likeliest.
                        alternatives.setdefault(TextStream(self.tokenizer, context).piece(i), v)
                    top.append(alternatives)
            offsets, pos = [], 0
            for piece in r.pieces:
                offsets.append(pos)
                pos += len(piece)
            out[id(r)] = {"tokens": r.pieces, "token_logprobs": chosen, "top_logprobs": top or None,
                          "text_offset": offsets}
        return out
