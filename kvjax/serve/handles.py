"""What a request hands its caller: ``RequestHandle`` (tokens and text as they come, in
a thread or an asyncio loop; cancel; the final ``Completion``), and ``TextDeltas``, the
incremental text of a request's tokens with its stop strings cut as OpenAI does."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import AsyncIterator, Callable, Iterator, Sequence

from kvjax.tokenizer import StreamDecoder


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one step added to a request: its new token ids and the text they complete
    (maybe ``""``: an incomplete character or what may begin a stop string is held back;
    a stop token or stop string adds none)."""

    token_ids: list[int]
    text: str


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request.

    Attributes:
      text: the generated text, cut before a stop string; no stop token's text.
      token_ids: the generated tokens, a stop token included (as ``kvjax.generate``).
      finish_reason: ``"stop"`` (stop token or string), ``"length"`` (``max_tokens``) or
        ``"cancelled"``.
      prompt_tokens, completion_tokens, cached_tokens: the usage (``cached_tokens``:
        prompt tokens served from the prefix cache).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class TextDeltas:
    """A request's text, delta by delta: its tokens decoded incrementally (never splitting
    a multi-byte character), cut before the first stop string, which ends it (``stopped``;
    the string excluded, as OpenAI's ``stop``); text that may begin a stop string is held
    back until it cannot. Without a tokenizer every delta is ``""``."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._decoder = None if tokenizer is None else StreamDecoder(tokenizer)
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def add(self, tokens: Sequence[int]) -> str:
        """The text ``tokens`` add (``""`` once stopped)."""
        if self._decoder is None or self.stopped:
            return ""
        return self._cut(self._decoder.add(tokens), final=False)

    def flush(self) -> str:
        """The text still held back, at the end of the request."""
        if self._decoder is None or self.stopped:
            return ""
        return self._cut(self._decoder.flush(), final=True)

    def _cut(self, new: str, final: bool) -> str:
        text = self._held + new
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[:min(found)]
        keep = 0 if final else stop_prefix_length(text, self._stop)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops`` (0: none)."""
    longest = max(map(len, stops), default=1) - 1
    for k in range(min(len(text), longest), 0, -1):
        if any(stop.startswith(text[-k:]) for stop in stops):
            return k
    return 0


_END = object()  # RequestHandle._next: the request ended
_NOTHING = object()  # RequestHandle._next: nothing new yet


class RequestHandle:
    """A request submitted to an ``Engine``: its progress, its output as it is made, and
    its usage. The engine's thread writes it; any thread (or an asyncio loop) reads it.

    Iterate it (``for delta in handle``, blocking) or ``stream()`` it (``async for``) to
    receive ``Delta``s as they are made; one consumer should take them (each delta is
    handed out once). ``result()`` waits for the whole ``Completion`` independently.
    An error in the engine's loop is raised from iteration and ``result()``.

    Attributes:
      id: the request's number in its engine.
      prompt_tokens: tokens of the prompt.
      cached_tokens: prompt tokens served from the prefix cache (their prefill skipped),
        None until admitted.
      completion_tokens: tokens generated so far.
      finish_reason: ``"stop"``, ``"length"``, ``"cancelled"``, None while running.
      submitted_at, admitted_at, first_token_at, finished_at: ``time.perf_counter()``
        when it was queued, given its row and blocks, got its first token and ended
        (None until then).
      token_times: ``time.perf_counter()`` when each generated token was handed to it.
    """

    def __init__(self, request_id: int, prompt_tokens: int, on_cancel: Callable[[], None]):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.cached_tokens: int | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.finished_at: float | None = None
        self.token_times: list[float] = []
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._deltas: collections.deque[Delta] = collections.deque()
        self._token_ids: list[int] = []
        self._texts: list[str] = []
        self._error: BaseException | None = None
        self._wakers: list[Callable[[], None]] = []

    @property
    def first_token_at(self) -> float | None:
        """``time.perf_counter()`` when its first token came (None until then)."""
        return self.token_times[0] if self.token_times else None

    @property
    def done(self) -> bool:
        """Whether the request ended (finished, cancelled or failed)."""
        return self.finish_reason is not None or self._error is not None

    def cancel(self) -> None:
        """Asks the engine to end the request: at its next step it frees the row and the
        blocks (their full blocks stay cached) and the request ends with ``"cancelled"``.
        Nothing happens to a request that has ended."""
        if not self.done:
            self._on_cancel()

    def __iter__(self) -> Iterator[Delta]:
        """The request's ``Delta``s, blocking until each is made; ends with the request."""
        while (delta := self._next(block=True)) is not _END:
            yield delta

    async def stream(self) -> AsyncIterator[Delta]:
        """``__iter__`` for asyncio: awaits each ``Delta`` without blocking the loop (the
        engine's thread wakes it through ``loop.call_soon_threadsafe``)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop was closed meanwhile
                pass

        with self._cond:
            self._wakers.append(wake)
        try:
            while True:
                ready.clear()  # before looking: a delta pushed after this wakes the wait
                delta = self._next(block=False)
                if delta is _END:
                    return
                if delta is _NOTHING:
                    await ready.wait()
                else:
                    yield delta
        finally:
            with self._cond:
                self._wakers.remove(wake)

    def result(self, timeout: float | None = None) -> Completion:
        """Waits for the request to end and returns its ``Completion``.

        Raises:
          TimeoutError: still running after ``timeout`` seconds.
          RuntimeError: the engine failed while running it.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} still running after {timeout} s")
            self._raise_error()
            return Completion(text="".join(self._texts), token_ids=list(self._token_ids),
                              finish_reason=self.finish_reason,
                              prompt_tokens=self.prompt_tokens,
                              completion_tokens=self.completion_tokens,
                              cached_tokens=self.cached_tokens or 0)

    def __repr__(self) -> str:
        return (f"RequestHandle(id={self.id}, prompt_tokens={self.prompt_tokens}, "
                f"completion_tokens={self.completion_tokens}, "
                f"finish_reason={self.finish_reason!r})")

    # ----- what the engine's thread calls -----

    def _admitted(self, cached_tokens: int) -> None:
        self.cached_tokens, self.admitted_at = cached_tokens, time.perf_counter()

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self.token_times.extend([time.perf_counter()] * len(delta.token_ids))
            self._token_ids.extend(delta.token_ids)
            self._texts.append(delta.text)
            self.completion_tokens = len(self._token_ids)
            self._deltas.append(delta)
            self._notify()

    def _finish(self, reason: str) -> None:
        with self._cond:
            self.finished_at = time.perf_counter()
            self.finish_reason = reason
            self._notify()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self.finished_at = time.perf_counter()
            self._error = error
            self._notify()

    def _notify(self) -> None:
        self._cond.notify_all()
        for wake in self._wakers:
            wake()

    def _next(self, block: bool):
        """The next delta, ``_END`` once the request ended and every delta was taken, or
        (``block=False``) ``_NOTHING`` when neither is there yet."""
        with self._cond:
            if block:
                self._cond.wait_for(lambda: self._deltas or self.done)
            if self._deltas:
                return self._deltas.popleft()
            self._raise_error()
            return _END if self.done else _NOTHING

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine failed while running request {self.id}: "
                               f"{self._error!r}") from self._error
