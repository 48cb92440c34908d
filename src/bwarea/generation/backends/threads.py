"""How many threads each CPU decode step runs on."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepThreads:
    """How many threads each decode step runs on: torch's thread count n, or one where that is faster now.

    A step of a few rows is many small ops, and on n threads each one is a fork-join of all n. With a core free
    for every thread that is faster than one thread. When other work keeps the cores busy (a second bwarea
    worker, a training job), a join waits for a descheduled thread, a scheduler slice of milliseconds, while
    OpenMP's spin-waiting threads hold the cores the others need: a step can take a hundred times longer
    (``bench_generation.py --busy`` measures it). One thread never waits on another; it slows only by its share
    of a core.

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
