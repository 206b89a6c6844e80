"""Continuous batching for the server: one thread runs the generation engine for every request at once.

A request hands its `Request` to `TextGenerator.submit` and reads the events of its sequence from an
asyncio queue. Between two engine steps the thread takes the requests that arrived (they join the running
batch at the next step: a prefill of the newcomers, then decoding with everyone) and drops the ones whose
client went away. The engine itself is single-threaded; only this thread touches it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import torch

from rosetta.generation.engine import Completion, Engine, Event, Generation, Request
from rosetta.serve.batching import Overloaded
from rosetta.serve.metrics import Metrics


def text_model(model):
    """The model the engine decodes with: a vision-language model's language model, else the model itself."""
    return getattr(model, "language_model", model)


class Stream:
    """One sequence as a request handler sees it: its events, in order, and a way to stop it."""

    def __init__(self, generator: TextGenerator, loop: asyncio.AbstractEventLoop):
        self.generator = generator
        self.loop = loop
        self.queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.sequence: Generation | None = None
        self.cancelled = False

    def push(self, item: Event | BaseException) -> None:  # from the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    async def completion(self) -> Completion:
        async for event in self.events():
            if event.finished:
                return event.sequence.completion()
        raise RuntimeError("the sequence ended without finishing")

    def cancel(self) -> None:
        """The client went away: its sequence stops at the next step and frees its row."""
        self.generator.cancel(self)


class TextGenerator:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 256, metrics: Metrics | None = None,
                 capacity: int = 256, compile: bool = False):
        self.model = model
        self.compile = compile
        self.engine = Engine(model, model.tokenizer.decode, max_batch=max_batch, capacity=capacity, compile=compile)
        self.max_queue = max_queue
        self.metrics = metrics
        self._inbox: list[tuple[Request, Stream]] = []
        self._streams: dict[int, Stream] = {}  # id(sequence) -> its stream
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="rosetta-generate", daemon=True)
                self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests; the running ones are cancelled and their streams end."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def submit(self, request: Request) -> Stream:
        """Queue a request (from the event loop); its events arrive on the returned stream."""
        stream = Stream(self, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is stopping")
            if len(self._inbox) + len(self.engine.waiting) >= self.max_queue:
                raise Overloaded(f"{self.max_queue} requests are already waiting; retry later")
            self._inbox.append((request, stream))
            self._cond.notify_all()
        return stream

    def cancel(self, stream: Stream) -> None:
        with self._cond:
            stream.cancelled = True
            if stream.sequence is not None:
                stream.sequence.cancel()
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return len(self.engine.rows)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._inbox or self.engine.busy or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        self._cancel_everything()
                        return
                    self._take_inbox()
                try:
                    events = self.engine.step()
                except BaseException as e:  # a bug or an out-of-memory: fail the requests, keep serving
                    self._fail_everything(e)
                    continue
                for event in events:
                    self._deliver(event)
                if self.metrics is not None:
                    self.metrics.sequences_running.set(self.running)
                    if self.engine.decoded:
                        self.metrics.batch_size.labels("generation").observe(self.engine.decoded)

    def _take_inbox(self) -> None:
        for request, stream in self._inbox:
            if stream.cancelled:
                continue
            try:
                stream.sequence = self.engine.submit(request)
            except Exception as e:
                stream.push(e)
                continue
            self._streams[id(stream.sequence)] = stream
        self._inbox.clear()

    def _deliver(self, event: Event) -> None:
        stream = self._streams.get(id(event.sequence))
        if stream is None:
            return
        if event.finished:
            del self._streams[id(event.sequence)]
            self._record(event.sequence)
            if event.sequence.error is not None:
                stream.push(event.sequence.error)
                return
        stream.push(event)

    def _record(self, sequence: Generation) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.tokens_generated.inc(len(sequence.tokens))
        m.prompt_tokens.inc(len(sequence.request.prompt))
        m.sequences_finished.labels(sequence.finish_reason or "cancelled").inc()
        if sequence.first_token_at is not None:
            m.time_to_first_token.observe(sequence.first_token_at - sequence.submitted)
            decoding = time.perf_counter() - sequence.first_token_at
            if len(sequence.tokens) > 1 and decoding > 0:
                m.tokens_per_second.observe((len(sequence.tokens) - 1) / decoding)

    def _fail_everything(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.push(error)
        self._streams.clear()
        self.engine = Engine(self.model, self.model.tokenizer.decode, max_batch=self.engine.max_batch,
                             capacity=self.engine.cache.capacity, compile=self.compile)

    def _cancel_everything(self) -> None:
        for sequence in [*self.engine.rows, *self.engine.waiting]:
            sequence.cancel()
        for event in self.engine.step():
            self._deliver(event)
        for _, stream in self._inbox:
            stream.push(Overloaded("the server is stopping"))
        self._inbox.clear()
