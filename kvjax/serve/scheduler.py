"""Which requests run: a FIFO queue of waiting requests, a fixed number of rows, and the
prompt tokens each step prefills (the host-side bookkeeping of ``kvjax.serve.Engine``;
no JAX here).

A request (a ``Job``) waits in the queue until a row is free and the pool can hold its
prompt and ``max_tokens`` (the engine allocates its blocks on admission), and, while the
engine defers it (its prompt continues with blocks a row still prefilling is about to
cache), lets the requests behind it go first; then it takes the row: first prefilling
its prompt a chunk per step, then decoding a token per step, until it stops, reaches
``max_tokens`` or is cancelled and gives the row back.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

from kvjax.requests import bucket


class EngineOverloaded(RuntimeError):
    """The engine's queue of waiting requests is full: retry later (an HTTP server
    answers 429 or 503)."""


@dataclasses.dataclass(eq=False)
class Job:
    """A request as the engine runs it.

    Attributes:
      handle: the caller's ``RequestHandle``.
      prompt: the prompt's token ids.
      max_tokens: new tokens at most.
      sampling: the request's ``SamplingParams`` (one row).
      seed: its randomness (``uint32``).
      stops: token ids that end it.
      text: its ``TextDeltas`` (detokenizing, stop strings).
      order: admission order (FIFO among rows).
      row: the engine row it holds, None while waiting.
      allocation: its blocks (``kvjax.paged.Allocation``), None while waiting.
      written: positions of its sequence whose K/V its blocks hold.
      generated: its new tokens so far.
      cancelled: the caller cancelled it; the engine retires it at its next step.
      in_flight: steps started for it whose token it has not taken yet (the engine
        starts a step before it reads the last one's tokens; the step that prefills a
        prompt's last chunk counts: its first token).
      greedy: whether it samples greedily (temperature 0).
      prompt_keys: the chained keys of its prompt's full blocks (``kvjax.paged.chain_keys``),
        computed by the engine once, None until then.
    """

    handle: Any
    prompt: list[int]
    max_tokens: int
    sampling: Any
    seed: int
    stops: frozenset[int]
    text: Any
    order: int = 0
    row: int | None = None
    allocation: Any = None
    written: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    in_flight: int = 0
    greedy: bool = False
    prompt_keys: list[bytes] | None = None

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not prefilled yet."""
        return max(len(self.prompt) - self.written, 0)

    @property
    def decoding(self) -> bool:
        """Whether it has its first token (taken, or in flight: still on the device) and
        feeds its last one to the next decode step."""
        return bool(self.generated) or (self.in_flight > 0 and self.prompt_left == 0)

    def written_tokens(self) -> list[int]:
        """The tokens whose K/V its blocks hold: the prompt, then the tokens fed back."""
        return (self.prompt + self.generated)[:self.written]


class Scheduler:
    """The queue and the rows. Not thread-safe: the engine holds its lock around calls.

    Args:
      rows: rows of the compiled decode step.
      max_waiting: requests the queue holds; ``enqueue`` refuses more.
    """

    def __init__(self, rows: int, max_waiting: int):
        self.max_waiting = max_waiting
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list[Job | None] = [None] * rows
        self._admitted = 0

    def enqueue(self, job: Job) -> None:
        """Appends ``job`` to the queue.

        Raises:
          EngineOverloaded: ``max_waiting`` requests are waiting already.
        """
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(
                f"the engine's queue is full ({self.max_waiting} requests waiting): retry later, "
                "or build the Engine with a larger max_waiting")
        self.waiting.append(job)

    def next_admission(self, deferred: Callable[[Job], bool] = lambda job: False
                       ) -> tuple[Job, int] | None:
        """The first waiting job that is not ``deferred`` and a free row for it, None if
        either is missing; the job stays in the queue until ``seat``."""
        if None not in self.rows:
            return None
        job = next((job for job in self.waiting if not deferred(job)), None)
        return None if job is None else (job, self.rows.index(None))

    def seat(self, job: Job, row: int) -> None:
        """Gives ``row`` to an admitted job (its allocation set), out of the queue."""
        self.waiting.remove(job)
        job.row, job.order = row, self._admitted
        self._admitted += 1
        self.rows[row] = job

    def vacate(self, job: Job) -> None:
        """Takes a job out of its row or the queue."""
        if job.row is not None:
            self.rows[job.row] = None
        elif job in self.waiting:
            self.waiting.remove(job)

    def running(self) -> list[Job]:
        """Jobs holding rows, in admission order."""
        return sorted((job for job in self.rows if job is not None), key=lambda job: job.order)

    def cancelled(self) -> list[Job]:
        """Jobs, running or waiting, their callers cancelled."""
        return [job for job in (*self.running(), *self.waiting) if job.cancelled]

    def prefill_plan(self, budget: int, whole_from: int | None = None, min_width: int = 1
                     ) -> list[tuple[Job, int]]:
        """``(job, tokens)`` to prefill this step: rows with prompt left, in admission
        order, each taking what it has left while its chunk, padded as it runs (to a power
        of two, at least ``min_width``), fits in what is left of ``budget``: the budget
        bounds the tokens the step computes, padding included. A chunk is cut to a power
        of two, the rest left for the next step, where that saves much (it holds
        ``whole_from`` tokens or more: no chunk computes ``whole_from`` padding tokens or
        more) or where the budget cuts it (it then ends the step's plan: a long prompt
        spreads over steps)."""
        padded = lambda tokens: bucket(tokens, min_width)
        plan = []
        for job in self.running():
            if budget < min_width:
                break
            take = min(job.prompt_left, budget)
            if not take:
                continue
            out_of_budget = take < job.prompt_left or padded(take) > budget
            if out_of_budget or (whole_from is not None and take >= whole_from):
                take = 1 << (take.bit_length() - 1)
            plan.append((job, take))
            budget -= padded(take)
            if out_of_budget:
                break
        return plan

    def decoding(self) -> list[Job]:
        """Jobs that take part in the next decode step."""
        return [job for job in self.running() if job.decoding]

    @property
    def idle(self) -> bool:
        """No job waits or runs."""
        return not self.waiting and all(job is None for job in self.rows)
