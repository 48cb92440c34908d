"""The model worker behind the server: one thread owns the model, requests wait in a bounded queue.

Why one thread: a model on one device runs one forward at a time anyway, and the model keeps per-call state
(``get_action_info``). So the event loop never runs the model; it puts a job on the queue and awaits events on
the job's own asyncio queue. The worker takes a job and, while the next waiting jobs sample the same way,
takes those too (up to ``max_batch`` rows, and only while the padded batch still fits the model's context) and
generates them as one left-padded batch. Events are handed to the event loop with ``call_soon_threadsafe`` onto
unbounded per-request queues, so a client that reads slowly only delays itself.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from ..generation import ActionControls
from ..generation.processors import FrequencyPresencePenalty, LogitBias
from ..display import TextStream, token_pieces


@dataclass
class Limits:
    """What one request may ask for, and how much waits. Exceeding a request limit is a 400 (413 for the body
    size); a full queue, a 503."""

    max_tokens: int = 256              # new tokens per completion
    max_prompt_tokens: int | None = None  # None: the model's context minus one new token
    max_n: int = 8                     # completions per prompt
    max_batch: int = 8                 # rows (prompts x best_of or n) generated together
    queue_size: int = 64               # requests waiting for the worker
    max_top_k: int = 20                # tokens listed per action by /v1/fanout, and logprobs alternatives
    max_body_bytes: int = 1 << 20      # request body size; larger bodies get 413 before they are parsed
    max_search_budget: int = 2048      # world-model token evaluations one `search` request may spend
    search_timeout: float = 60.0       # seconds one search may run on the worker (it holds the model meanwhile)


class Overloaded(Exception):
    """The request queue is full."""


@dataclass
class Completion:
    """One validated completion request: token-id prompts and how to sample them."""

    prompts: list[list[int]]
    max_tokens: int = 16               # 0: score the prompt only (with echo)
    n: int = 1
    best_of: int | None = None         # samples per prompt, of which the n with the best mean logprob are kept
    stop: list[str] = field(default_factory=list)
    temperature: float = 1.0           # 0: argmax tokens
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    actions: int | list[int] | None = None
    allowed_actions: list[int] | None = None
    action_greedy: bool = False
    action_temperature: float | None = None   # None: the model's (config.action_temperature)
    logprobs: int | None = None        # alternatives per token; None: no logprobs
    echo: bool = False                 # the prompt comes back with the text (and its logprobs)
    stream: bool = False

    @property
    def samples(self) -> int:
        return self.best_of or self.n

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.samples

    def batch_key(self):
        """Requests with equal keys can share a batch. A seeded request that samples runs alone so its samples are
        its own; scoring (max_tokens 0) generates nothing, so any scoring requests can go together."""
        if self.max_tokens == 0:
            return ("score",)
        if self.seed is not None and (self.temperature > 0 or not self.action_greedy):
            return None
        return ("generate", self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.action_greedy,
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
    action_logprobs: list[float] = field(default_factory=list)
    scores: tuple | None = None  # (token logprobs, top alternatives) of prompt + new tokens, position 0 None
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
        context = self.model.config.max_position_embeddings
        while not self._closing.is_set():
            job = self._next()
            if job is None or job.ticket.cancelled:
                continue
            if job.fn is not None:
                self._run_call(job)
                continue
            batch, rows, key = [job], job.request.rows, job.request.batch_key()
            width, steps = max(len(p) for p in job.request.prompts), job.request.max_tokens
            while key is not None and rows < self.limits.max_batch:
                try:
                    other = self._queue.get_nowait()
                except queue.Empty:
                    break
                # Left padding makes every row as long as the longest prompt, and every row runs for the batch's
                # most steps: a request valid alone joins only a batch whose padded length still fits.
                other_width = max(len(p) for p in other.request.prompts) if other.fn is None else 0
                fits = (other.fn is None and other.request.batch_key() == key
                        and rows + other.request.rows <= self.limits.max_batch
                        and max(width, other_width) + max(steps, other.request.max_tokens) <= context)
                if not fits:
                    self._pending.append(other)  # first in line for the next batch
                    break
                if not other.ticket.cancelled:
                    batch.append(other)
                    rows += other.request.rows
                    width, steps = max(width, other_width), max(steps, other.request.max_tokens)
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
        rows = [_Row(job, p * job.request.samples + j, prompt, job.request.max_tokens,
                     TextStream(self.tokenizer, prompt, job.request.stop))
                for job in batch for p, prompt in enumerate(job.request.prompts) for j in range(job.request.samples)]
        generating = [r for r in rows if r.max_tokens > 0]
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        try:
            with self.lock, torch.inference_mode():
                if generating:
                    out = self._generate(batch[0].request, generating)
                    for r, logprobs in zip(generating, out.action_logprobs.tolist()):
                        r.action_logprobs = logprobs[:len(r.token_ids)]
                for r in rows:
                    request = r.job.request
                    if (request.logprobs is not None or request.samples > request.n) and not r.job.ticket.cancelled:
                        r.scores = self._scores(r, request.logprobs or 0)
        except Exception as err:
            for job in batch:
                job.ticket.send("error", err)
            return
        finally:
            self.model.reset_action_info()  # the worker lives long: don't let the action record grow
        for job in batch:
            job.ticket.send("done", self._choices(job, [r for r in rows if r.job is job]))

    def _choices(self, job: _Job, rows: list[_Row]) -> list[dict]:
        """Finished rows of one job -> its choices: the best ``n`` of each prompt's samples, in index order."""
        request = job.request
        for row in rows:
            tail = row.stream.flush()
            if row.finish is None:
                row.finish = "length"
                if tail and request.stream:
                    job.ticket.send("token", (row.index, tail, None, None, ""))
        kept = []
        for p in range(len(request.prompts)):
            samples = rows[p * request.samples:(p + 1) * request.samples]
            if request.samples > request.n:  # best_of: rank by mean logprob of the new tokens
                samples = sorted(samples, key=lambda r: -_mean(r.scores[0][len(r.prompt):]) if r.scores else 0.0)
            kept += [(p * request.n + k, r) for k, r in enumerate(samples[:request.n])]
        return [self._choice(index, row, request) for index, row in kept]

    def _choice(self, index: int, row: _Row, request: Completion) -> dict:
        text, pieces, start = row.stream.text, list(row.pieces), len(row.prompt)
        if request.echo:
            prompt_pieces = token_pieces(self.tokenizer, row.prompt)
            text, pieces, start = "".join(prompt_pieces) + text, prompt_pieces + pieces, 0
        logprobs = None
        if request.logprobs is not None and row.scores is not None:
            chosen, top = (s[start:] for s in row.scores)
            offsets, pos = [], 0
            for piece in pieces:
                offsets.append(pos)
                pos += len(piece)
            logprobs = {"tokens": pieces, "token_logprobs": chosen,
                        "top_logprobs": top if request.logprobs else None, "text_offset": offsets}
        return {"index": index, "text": text, "finish_reason": row.finish, "token_ids": row.token_ids,
                "tokens": row.pieces, "actions": row.actions, "action_logprobs": row.action_logprobs,
                "prompt_tokens": len(row.prompt), "logprobs": logprobs}

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

        extra = {}
        processors = self._processors(rows, width)
        if processors:
            extra["logits_processor"] = processors
        # Each row's own action controls, checked when the request came in, as one batch's tensors.
        controls = ActionControls.per_row(model.config.num_actions, steps, device,
                                          [r.job.request.actions for r in rows],
                                          [r.job.request.allowed_actions for r in rows])
        return model.generate(
            ids.to(device), mask.to(device), max_new_tokens=steps, do_sample=request.temperature > 0,
            temperature=request.temperature if request.temperature > 0 else 1.0, top_p=request.top_p,
            top_k=request.top_k, repetition_penalty=request.repetition_penalty, pad_token_id=pad,
            actions=controls.schedule, allowed_actions=controls.allowed,
            action_greedy=request.action_greedy, action_temperature=request.action_temperature,
            step_callback=on_step, generator=generator, return_dict_in_generate=True, **extra)

    def _processors(self, rows: list[_Row], width: int) -> LogitsProcessorList | None:
        """Per-row token-logit adjustments (OpenAI penalties, logit_bias); None when no row asks for one."""
        processors = LogitsProcessorList()
        requests = [r.job.request for r in rows]
        if any(q.frequency_penalty or q.presence_penalty for q in requests):
            processors.append(FrequencyPresencePenalty(width, [q.frequency_penalty for q in requests],
                                                       [q.presence_penalty for q in requests]))
        if any(q.logit_bias for q in requests):
            processors.append(LogitBias([q.logit_bias or {} for q in requests], self.model.config.vocab_size))
        return processors or None

    def _scores(self, row: _Row, k: int) -> tuple[list, list]:
        """Log-probs of a finished row's prompt and new tokens under BWArea as a language model.

        -> (token logprobs, top-k alternatives), one entry per token of prompt + new tokens; the first token has
        None (nothing predicts it). Every entry is the mixture over actions, sum_a pi(a | x_<=t) p_world(x_t+1 |
        x_<=t, a), with the context understood by the inverse dynamics: the same numbers for a prompt token and a
        generated one, whichever action produced it. One row at a time, so no row's numbers depend on another.
        """
        seq = row.prompt + row.token_ids
        ids = torch.tensor([seq], device=self.model.device)
        logp = self.model.lm_logprobs(ids)[0, :-1].float()                      # (T-1, V): token t+1 given <= t
        targets = ids[0, 1:]
        chosen = [None] + logp.gather(-1, targets[:, None])[:, 0].tolist()
        top = [None]
        if k:
            values, indices = logp.topk(k, dim=-1)
            for j, (vs, ix) in enumerate(zip(values.tolist(), indices.tolist())):
                alternatives = {}
                for v, i in zip(vs, ix):
                    # Tokens that write the same text share a key (the OpenAI format); keep the likeliest.
                    alternatives.setdefault(TextStream(self.tokenizer, seq[max(0, j - 3):j + 1]).piece(i), v)
                top.append(alternatives)
        return chosen, top


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("-inf")

