"""The micro-batcher and the embedding cache on their own: no model, no HTTP."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rosetta.serve.batching import MicroBatcher, Overloaded
from rosetta.serve.cache import EmbeddingCache, content_key


class Recorder:
    """A runner that records each call (items and thread) and can hold the worker until released."""

    def __init__(self, hold: bool = False):
        self.calls: list[list] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, items: list) -> np.ndarray:
        self.calls.append(list(items))
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(30)
        return np.asarray([[float(x), 2.0 * x] for x in items], np.float32).reshape(len(items), 2)


def started(batcher: MicroBatcher) -> MicroBatcher:
    batcher.start()
    return batcher


def hold_worker(batcher: MicroBatcher, runner: Recorder, modality: str = "image"):
    """Occupy the worker with a first job, so that everything submitted next waits in the queue."""
    first = batcher.submit(modality, [-1])
    assert runner.entered.wait(30)
    return first


def test_waiting_requests_share_one_model_call_and_each_gets_its_rows():
    runner = Recorder(hold=True)
    batcher = started(MicroBatcher({"image": runner}, max_batch=32, max_wait_ms=0))
    try:
        first = hold_worker(batcher, runner)
        futures = [batcher.submit("image", [i, i + 100]) for i in range(5)]
        runner.release.set()
        assert first[0].result(30)[:, 0].tolist() == [-1]
        for i, (future,) in enumerate(futures):
            rows = future.result(30)
            assert rows[:, 0].tolist() == [i, i + 100]  # its own rows, in its order
            assert rows[:, 1].tolist() == [2 * i, 2 * (i + 100)]
        assert runner.calls == [[-1], [0, 100, 1, 101, 2, 102, 3, 103, 4, 104]]  # one call for all five
        assert runner.threads == {"rosetta-model"}  # one thread owns the model
    finally:
        batcher.stop()


def test_batches_never_exceed_max_batch():
    runner = Recorder(hold=True)
    batcher = started(MicroBatcher({"image": runner}, max_batch=4, max_wait_ms=0))
    try:
        hold_worker(batcher, runner)
        singles = [batcher.submit("image", [i])[0] for i in range(10)]
        big = batcher.submit("image", list(range(100, 110)))  # one request larger than a batch is split
        runner.release.set()
        assert [f.result(30)[0, 0] for f in singles] == list(range(10))
        assert np.concatenate([f.result(30) for f in big])[:, 0].tolist() == list(range(100, 110))
        assert all(len(call) <= 4 for call in runner.calls)
        assert [x for call in runner.calls[1:] for x in call] == [*range(10), *range(100, 110)]
    finally:
        batcher.stop()


def test_modalities_have_separate_queues():
    images, texts = Recorder(hold=True), Recorder()
    batcher = started(MicroBatcher({"image": images, "text": texts}, max_batch=32, max_wait_ms=0))
    try:
        hold_worker(batcher, images)
        a = batcher.submit("text", [1, 2])
        b = batcher.submit("image", [3])
        c = batcher.submit("text", [4])
        images.release.set()
        for futures in (a, b, c):
            futures[0].result(30)
        assert texts.calls == [[1, 2, 4]]
        assert images.calls == [[-1], [3]]
    finally:
        batcher.stop()


def test_without_batching_every_request_runs_alone():
    runner = Recorder(hold=True)
    batcher = started(MicroBatcher({"image": runner}, max_batch=32, max_wait_ms=0, enabled=False))
    try:
        hold_worker(batcher, runner)
        futures = [batcher.submit("image", [i, i])[0] for i in range(3)]
        runner.release.set()
        for f in futures:
            f.result(30)
        assert runner.calls == [[-1], [0, 0], [1, 1], [2, 2]]
    finally:
        batcher.stop()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    calls = []

    def runner(items):
        calls.append(items)
        if "boom" in items:
            raise RuntimeError("model failed")
        return np.zeros((len(items), 1), np.float32)

    batcher = started(MicroBatcher({"text": runner}, max_wait_ms=0))
    try:
        with pytest.raises(RuntimeError, match="model failed"):
            batcher.run("text", ["boom"])
        assert batcher.run("text", ["fine", "too"]).shape == (2, 1)
    finally:
        batcher.stop()


def test_stop_finishes_queued_work_then_refuses_new_work():
    runner = Recorder(hold=True)
    batcher = started(MicroBatcher({"image": runner}, max_batch=2, max_wait_ms=0))
    hold_worker(batcher, runner)
    queued = [batcher.submit("image", [i])[0] for i in range(5)]
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    runner.release.set()
    stopper.join(30)
    assert [f.result(0)[0, 0] for f in queued] == list(range(5))  # all done before stop returned
    with pytest.raises(Overloaded):
        batcher.submit("image", [1])


def test_a_full_queue_refuses_with_overloaded():
    runner = Recorder(hold=True)
    batcher = started(MicroBatcher({"image": runner}, max_batch=4, max_wait_ms=0, max_queue=3))
    try:
        hold_worker(batcher, runner)
        batcher.submit("image", [1, 2, 3])
        with pytest.raises(Overloaded, match="already waiting"):
            batcher.submit("image", [4])
    finally:
        runner.release.set()
        batcher.stop()


def test_a_long_wait_still_ends_when_the_batch_is_full():
    runner = Recorder()
    # An hour's wait: a batch must leave as soon as it is full, not when the wait is over.
    batcher = started(MicroBatcher({"text": runner}, max_batch=3, max_wait_ms=3_600_000))
    try:
        futures = [batcher.submit("text", [i])[0] for i in range(3)]
        assert [f.result(60)[0, 0] for f in futures] == [0, 1, 2]
        assert runner.calls == [[0, 1, 2]]
    finally:
        batcher.stop()


def test_a_batch_waits_for_inputs_that_were_being_decoded_when_it_opened():
    """Clients answered together come back together: a batch opened by the first one to be decoded waits for the
    others (well past max_wait_ms), and leaves once the last announced input is in."""
    runner = Recorder()
    batcher = started(MicroBatcher({"image": runner}, max_batch=8, max_wait_ms=0, arriving_wait_ms=60_000))
    try:
        with batcher.arriving("image"):  # the second request, still decoding
            with batcher.arriving("image"):  # the first
                first = batcher.submit("image", [1])
            time.sleep(0.2)  # the batch is open, and waiting
            assert runner.calls == []
            second = batcher.submit("image", [2])
        assert [first[0].result(30)[0, 0], second[0].result(30)[0, 0]] == [1, 2]
        assert runner.calls == [[1, 2]]
    finally:
        batcher.stop()


def test_an_announcement_withdrawn_without_input_lets_the_batch_go():
    """A request that needed no model call (cache hits) or failed to decode ends its announcement; the batch
    waiting for it leaves then, not when arriving_wait_ms is over."""
    runner = Recorder()
    batcher = started(MicroBatcher({"image": runner}, max_batch=8, max_wait_ms=0, arriving_wait_ms=3_600_000))
    try:
        with batcher.arriving("image"):  # a request that will submit nothing
            future = batcher.submit("image", [7])[0]
            time.sleep(0.1)
            assert runner.calls == []  # the batch waits for the announced input...
        assert future.result(60)[0, 0] == 7  # ...and leaves when the announcement is withdrawn
        assert runner.calls == [[7]]
    finally:
        batcher.stop()


def test_other_modalities_waiting_cut_the_wait_for_announced_inputs():
    images, texts = Recorder(), Recorder()
    batcher = started(MicroBatcher({"image": images, "text": texts}, max_batch=8, max_wait_ms=0,
                                   arriving_wait_ms=3_600_000))
    try:
        with batcher.arriving("image"):
            image = batcher.submit("image", [1])[0]
            time.sleep(0.1)
            assert images.calls == []
            text = batcher.submit("text", [2])[0]  # a text request behind the waiting image batch
            assert image.result(60)[0, 0] == 1 and text.result(60)[0, 0] == 2
        assert images.calls == [[1]] and texts.calls == [[2]]
    finally:
        batcher.stop()


def test_cache_is_lru_and_keyed_by_content_modality_and_model():
    cache = EmbeddingCache(max_entries=2)
    a, b, c = (content_key("text", s, "tiny") for s in ("a", "b", "c"))
    assert content_key("text", "a", "other") != a  # another model's embedding is another entry
    assert content_key("image", b"a", "tiny") != a  # the same bytes as text and as an image differ
    assert content_key("text", "a", "tiny") == a
    cache.put(a, np.ones(3))
    cache.put(b, np.zeros(3))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, np.ones(3))  # evicts b, the least recently used
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    assert len(cache) == 2
    with pytest.raises(ValueError):
        cache.get(a)[0] = 5.0  # entries are shared read-only


def test_cache_of_size_zero_keeps_nothing():
    cache = EmbeddingCache(max_entries=0)
    key = content_key("text", "a", "tiny")
    cache.put(key, np.ones(3))
    assert cache.get(key) is None and len(cache) == 0
