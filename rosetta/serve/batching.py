"""Dynamic micro-batching: concurrent requests share one model call.

One worker thread owns the model. Requests put their inputs on the queue of their modality and
wait; the worker takes the oldest waiting job, then keeps gathering jobs of the same modality until
the batch holds `max_batch` inputs or `max_wait_ms` have passed since that job arrived, runs the
model once, and hands each job its rows. Inputs that had already reached the server when the batch
opened, and are only being decoded (`arriving`), are waited for longer (`arriving_wait_ms`): clients
that send their next request when the last one is answered arrive together and are decoded one by
one, and a batch cut at `max_wait_ms` would run the model on a few of them, then again on the rest.
With batching off each job runs alone (one request's inputs per call), which is the baseline the
benchmark compares against.

Videos run one to a batch (`batch_limits`): the model embeds them one by one anyway, and one that
fails to decode must fail alone. So do the window-by-window embeddings of a sound or a video that
indexing asks for ("audio_segments", "video_segments"): each is a whole file's rows.

`BatchedModel` is the model as the server's handlers see it: the embedding cache first, then the
batcher. It offers `embed_texts` / `embed_images` / `embed_audio` / `embed_videos` like the model
does, so library functions that take a model (search, indexing) run through the same worker and cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rosetta.errors import InputError
from rosetta.modalities.image import MAX_PIXELS, ImageInput, describe, load_image, preprocess
from rosetta.serve.cache import EmbeddingCache, content_key
from rosetta.serve.metrics import Metrics

Runner = Callable[[list[Any]], Any]  # rows: an array, or (segments) a list with one entry per item


class Overloaded(RuntimeError):
    """The queue is full or the batcher is stopping: the request should be retried later."""


@dataclass
class _Job:
    items: list[Any]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gathers jobs per modality into bounded batches and runs them on one worker thread."""

    def __init__(self, runners: dict[str, Runner], max_batch: int = 32, max_wait_ms: float = 5.0,
                 enabled: bool = True, max_queue: int = 4096, metrics: Metrics | None = None,
                 batch_limits: dict[str, int] | None = None, arriving_wait_ms: float = 250.0):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 0 <= max_wait_ms < math.inf or not 0 <= arriving_wait_ms < math.inf:
            raise ValueError("max_wait_ms and arriving_wait_ms must be finite and >= 0")
        self.runners = runners
        self.max_batch = max_batch
        # Inputs per model call of each modality, where fewer than max_batch.
        self.limits = {m: min(max_batch, (batch_limits or {}).get(m, max_batch)) for m in runners}
        self.max_wait = max_wait_ms / 1000
        # For inputs being decoded when a batch opens: an 8-megapixel JPEG takes ~0.1 s on one core, 32 small ones
        # ~0.03 s on two.
        self.arriving_wait = max(arriving_wait_ms / 1000, self.max_wait)
        self.enabled = enabled
        self.max_queue = max_queue
        self.metrics = metrics
        self._queues: dict[str, deque[_Job]] = {modality: deque() for modality in runners}
        self._queued = dict.fromkeys(runners, 0)
        self._arriving: dict[str, dict[object, float]] = {modality: {} for modality in runners}  # token: since
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="rosetta-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def submit(self, modality: str, items: Sequence[Any]) -> list[Future]:
        """Queue `items`, split into jobs of at most `max_batch`; each future gives its rows as an array."""
        if modality not in self._queues:
            raise ValueError(f"no runner for modality {modality!r}")
        size = self.limits[modality]
        jobs = [_Job(list(items[i : i + size])) for i in range(0, len(items), size)]
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if self._thread is None:
                self.start()  # used without the app's lifespan (some test clients skip it)
            if sum(self._queued.values()) >= self.max_queue:  # one request may bring more; the next one waits
                raise Overloaded(f"{self.max_queue} inputs are already waiting for the model; retry later")
            self._queues[modality].extend(jobs)
            self._queued[modality] += len(items)
            self._gauge(modality)
            self._cond.notify_all()
        return [job.future for job in jobs]

    @contextlib.contextmanager
    def arriving(self, modality: str):
        """Announce inputs being decoded for a `submit` made inside the block: a batch that opens meanwhile waits
        for them (see the module docstring). Leaving the block withdraws the announcement."""
        token = object()
        with self._cond:
            if modality in self._arriving:
                self._arriving[modality][token] = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._arriving.get(modality, {}).pop(token, None)
                self._cond.notify_all()

    def run(self, modality: str, items: Sequence[Any]) -> np.ndarray:
        """Blocking: the rows for `items`, in order (for worker threads of the web framework)."""
        return _concat([f.result() for f in self.submit(modality, items)])

    async def arun(self, modality: str, items: Sequence[Any]) -> np.ndarray:
        """The rows for `items`, in order, without blocking the event loop while the model works."""
        return await self.results(self.submit(modality, items))

    @staticmethod
    async def results(futures: list[Future]) -> np.ndarray:
        """The rows of `submit`'s futures, in order, awaited; cancelling drops the jobs that have not started."""
        try:
            return _concat(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except asyncio.CancelledError:  # the client went away: drop the jobs that have not started
            for f in futures:
                f.cancel()
            raise

    def _gauge(self, modality: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_items.labels(modality).set(self._queued[modality])

    def _take(self) -> tuple[str, list[_Job]] | None:
        """Under the lock: the next batch, waiting for it; None once stopping with nothing left."""
        while True:
            while not self._stopping and not any(self._queues.values()):
                self._cond.wait()
            waiting = [m for m, q in self._queues.items() if q]
            if not waiting:
                return None  # stopping, and every queue is drained
            modality = min(waiting, key=lambda m: self._queues[m][0].enqueued)
            queue = self._queues[modality]
            jobs = [queue.popleft()]
            size = len(jobs[0].items)
            if self.enabled:
                opened = time.monotonic()
                deadline, patience = jobs[0].enqueued + self.max_wait, opened + self.arriving_wait
                while size < self.limits[modality]:
                    if queue:
                        if size + len(queue[0].items) > self.limits[modality]:
                            break
                        jobs.append(queue.popleft())
                        size += len(jobs[-1].items)
                        continue
                    # Not while another modality's requests queue: they would wait behind these.
                    others = any(q for m, q in self._queues.items() if m != modality)
                    decoding = not others and any(since <= opened for since in self._arriving[modality].values())
                    remaining = (patience if decoding else deadline) - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
            self._queued[modality] -= size
            self._gauge(modality)
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if jobs:
                return modality, jobs

    def _loop(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
            if taken is None:
                return
            modality, jobs = taken
            items = [item for job in jobs for item in job.items]
            start = time.perf_counter()
            try:
                rows = self.runners[modality](items)
            except BaseException as e:  # hand the error to every waiting request; the worker lives on
                for job in jobs:
                    job.future.set_exception(e)
                continue
            if self.metrics is not None:
                self.metrics.batch_size.labels(modality).observe(len(items))
                self.metrics.model_seconds.labels(modality).observe(time.perf_counter() - start)
            offset = 0
            for job in jobs:
                job.future.set_result(rows[offset : offset + len(job.items)])
                offset += len(job.items)


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def embedded_modalities(model) -> set[str]:
    """What a model embeds: of "text", "image", "audio" and "video", those it has the calls (and the towers) for."""
    calls = {"text": "embed_texts", "image": "embed_images", "audio": "embed_audio", "video": "embed_videos"}
    can = {modality for modality, call in calls.items() if callable(getattr(model, call, None))}
    if "audio" not in getattr(model, "bound_modalities", ("audio",)):  # a CLIP hears only with a bound audio tower
        can.discard("audio")
    return can


# Videos, and each recording's windows, one per model call: see the module docstring.
BATCH_LIMITS = {"video": 1, "audio_segments": 1, "video_segments": 1}
# The model's window-by-window calls (for indexing), and the runner each goes through.
SEGMENT_CALLS = {"embed_audio_segments": "audio_segments", "embed_video_segments": "video_segments"}
# What a model that lacks a modality answers when given one.
CANNOT = {"image": "this model does not embed images", "audio": "this model has no audio tower: it cannot embed sounds",
          "video": "this model does not embed videos"}


def model_runners(model) -> dict[str, Runner]:
    """What the worker runs, for each modality the model embeds: preprocessed pixels [3, H, W], strings, or a
    sound's or video's file bytes in; normalised float32 rows out."""

    def images(pixels: list[torch.Tensor]) -> np.ndarray:
        return model.embed_images(torch.stack(pixels), batch_size=len(pixels)).cpu().numpy()

    def texts(strings: list[str]) -> np.ndarray:
        return model.embed_texts(strings, batch_size=len(strings)).cpu().numpy()

    def audio(files: list[bytes]) -> np.ndarray:
        return model.embed_audio(files, batch_size=len(files)).cpu().numpy()

    def videos(files: list[bytes]) -> np.ndarray:
        return model.embed_videos(files).cpu().numpy()

    runners = {"image": images, "text": texts, "audio": audio, "video": videos}
    out = {modality: runners[modality] for modality in embedded_modalities(model)}
    for call, job in SEGMENT_CALLS.items():
        if job.split("_")[0] in out and callable(getattr(model, call, None)):
            out[job] = lambda files, call=call: [getattr(model, call)(file) for file in files]
    return out


class BatchedModel:
    """Embeddings through the cache and the micro-batcher; bad images, sounds and videos raise InputError naming
    them (before they join a batch)."""

    def __init__(self, model, batcher: MicroBatcher, cache: EmbeddingCache, name: str,
                 max_pixels: int = MAX_PIXELS, metrics: Metrics | None = None, max_seconds: float | None = None):
        self.model = model
        self.batcher = batcher
        self.cache = cache
        self.name = name
        self.max_pixels = max_pixels
        self.max_seconds = max_seconds  # the longest sound or video accepted
        self.metrics = metrics
        self.modalities = embedded_modalities(model)

    @property
    def config(self):
        return self.model.config

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    def __getattr__(self, name: str):  # anything else a library function asks of a model
        if name in ("model", "batcher"):  # not set yet (copying, unpickling): do not recurse
            raise AttributeError(name)
        job = SEGMENT_CALLS.get(name)
        if job is not None and job in self.batcher.runners:
            # Indexing a recording runs on the model's thread too, rather than beside it on the caller's.
            return lambda item: self.batcher.run(job, [item])[0]
        return getattr(self.model, name)

    # Texts

    def embed_texts(self, texts: str | Sequence[str], batch_size: int | None = None, progress: bool | None = None,
                    truncate: bool = True) -> torch.Tensor:
        """Like the model's `embed_texts` (L2-normalised [N, D]), through the cache and the batcher; blocking."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        found, keys, missing = self._lookup("text", texts)
        if missing:
            self._fill("text", found, keys, missing, self.batcher.run("text", [texts[i] for i in missing]))
        return torch.from_numpy(self._stack(found))

    async def aembed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        found, keys, missing = self._lookup("text", texts)
        if missing:
            self._fill("text", found, keys, missing, await self.batcher.arun("text", [texts[i] for i in missing]))
        return self._stack(found)

    # Images

    def embed_images(self, images: torch.Tensor | ImageInput | Sequence[ImageInput], batch_size: int | None = None,
                     progress: bool | None = None) -> torch.Tensor:
        """Like the model's `embed_images`, through the cache and the batcher; blocking."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise InputError(f"pixel tensor: expected float [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
            if len(images) == 0:
                return torch.empty(0, self.dim)
            return torch.from_numpy(self.batcher.run("image", list(images.float().cpu())))
        if not isinstance(images, (list, tuple)):
            images = [images]
        contents = [_image_content(image) for image in images]
        found, keys, missing = self._lookup("image", contents)
        if missing:
            pixels = [self.preprocess(images[i]) for i in missing]
            self._fill("image", found, keys, missing, self.batcher.run("image", pixels))
        return torch.from_numpy(self._stack(found))

    async def aembed_images(self, blobs: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings of encoded images (uploads): the cache and decoding in a worker thread, announced to the
        batcher (a batch opening meanwhile waits for these images), the model in the batcher."""
        names = list(names) if names is not None else [describe(b) for b in blobs]
        return await self._aembed("image", list(blobs), lambda i: self.preprocess(blobs[i], names[i]))

    def preprocess(self, image: ImageInput, name: str | None = None) -> torch.Tensor:
        """Decode (refusing more than `max_pixels`) and preprocess one image into pixels [3, H, W]."""
        self._require("image")
        try:
            rgb = load_image(image, max_pixels=self.max_pixels)
        except InputError as e:
            if name is None:
                raise
            reason = str(e).split(": ", 1)[-1]
            raise InputError(f"{name}: {reason}") from None
        return preprocess(rgb, self.model.config.vision.image_size, self.model.config.image)

    # Sounds and videos: file bytes (uploads); checked here, decoded by the model in the batcher

    def embed_audio(self, audio: bytes | Sequence[bytes], batch_size: int | None = None,
                    progress: bool | None = None) -> torch.Tensor:
        """Like the model's `embed_audio`, for encoded sounds, through the cache and the batcher; blocking."""
        return torch.from_numpy(self._embed_files("audio", [audio] if isinstance(audio, bytes) else list(audio)))

    def embed_videos(self, videos: bytes | Sequence[bytes], progress: bool | None = None) -> torch.Tensor:
        """Like the model's `embed_videos`, for encoded videos, through the cache and the batcher; blocking."""
        return torch.from_numpy(self._embed_files("video", [videos] if isinstance(videos, bytes) else list(videos)))

    async def aembed_audio(self, blobs: Sequence[bytes], names: Sequence[str]) -> np.ndarray:
        return await self._aembed_files("audio", list(blobs), list(names))

    async def aembed_videos(self, blobs: Sequence[bytes], names: Sequence[str]) -> np.ndarray:
        return await self._aembed_files("video", list(blobs), list(names))

    def check(self, modality: str, blob: bytes, name: str) -> None:
        """Refuse a sound or video the model cannot take: no tower for it, not decodable, no audio track, or
        longer than `max_seconds`; InputError naming it."""
        from rosetta.modalities.audio import load_audio
        from rosetta.modalities.video import video_duration

        self._require(modality)
        try:
            if modality == "audio":
                # Decoded once here so that a bad sound is refused alone; the model decodes it again at its rate.
                load_audio(blob, max_seconds=self.max_seconds)
            else:
                seconds = video_duration(blob)
                if self.max_seconds is not None and seconds > self.max_seconds:
                    raise InputError(f"longer than the limit of {self.max_seconds:g} s")
        except InputError as e:
            raise InputError(f"{name}: {str(e).removeprefix(f'<{len(blob)} bytes>: ')}") from None

    def _require(self, modality: str) -> None:
        if modality not in self.modalities:
            raise InputError(CANNOT[modality])

    def _embed_files(self, modality: str, blobs: list[bytes]) -> np.ndarray:
        found, keys, missing = self._lookup(modality, blobs)
        if missing:
            for i in missing:
                self.check(modality, blobs[i], f"{modality} {i}")
            self._fill(modality, found, keys, missing, self.batcher.run(modality, [blobs[i] for i in missing]))
        return self._stack(found)

    async def _aembed_files(self, modality: str, blobs: list[bytes], names: list[str]) -> np.ndarray:
        def checked(i: int) -> bytes:
            self.check(modality, blobs[i], names[i])
            return blobs[i]

        return await self._aembed(modality, blobs, checked)

    async def _aembed(self, modality: str, contents: list[bytes], prepare: Callable[[int], Any]) -> np.ndarray:
        """Rows for uploads: the cache, then `prepare(i)` (decode, check) for each one it lacks, in a worker thread
        and announced to the batcher, then the model in the batcher."""
        from starlette.concurrency import run_in_threadpool

        def looked_up():
            found, keys, missing = self._lookup(modality, contents)
            return found, keys, missing, [prepare(i) for i in missing]

        with self.batcher.arriving(modality):
            found, keys, missing, items = await run_in_threadpool(looked_up)
            futures = self.batcher.submit(modality, items) if missing else []
        if missing:
            self._fill(modality, found, keys, missing, await self.batcher.results(futures))
        return self._stack(found)

    # The cache

    def _lookup(self, modality: str, contents: list[bytes | str]):
        keys = [content_key(modality, content, self.name) for content in contents]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, vector in enumerate(found) if vector is None]
        if self.metrics is not None:
            self.metrics.cache_hits.labels(modality).inc(len(found) - len(missing))
            self.metrics.cache_misses.labels(modality).inc(len(missing))
        return found, keys, missing

    def _fill(self, modality: str, found: list, keys: list, missing: list[int], rows: np.ndarray) -> None:
        for i, row in zip(missing, rows):
            found[i] = row
            self.cache.put(keys[i], row)

    def _stack(self, found: list[np.ndarray]) -> np.ndarray:
        return np.stack(found).astype(np.float32, copy=False) if found else np.zeros((0, self.dim), np.float32)


def _image_content(image: ImageInput) -> bytes:
    """The bytes an image is cached by: a file's or upload's encoded bytes, or a decoded image's pixels."""
    from PIL import Image

    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return path.read_bytes()
    if isinstance(image, np.ndarray):
        return f"array {image.dtype} {image.shape}\0".encode() + np.ascontiguousarray(image).tobytes()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        buffer.write(f"pil {image.mode} {image.size}\0".encode())
        buffer.write(hashlib.sha256(image.tobytes()).digest())
        return buffer.getvalue()
    raise InputError(f"{describe(image)}: not an image (expected a path, bytes, PIL image or array)")
