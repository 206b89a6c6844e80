"""The generation engine on the `tiny-lm` preset (random weights, byte-level tokenizer): stopping, streaming,
sampling, seeds, batching, continuous batching, cancellation, logits processors and JSON-schema constraints.

A logits processor that forces chosen tokens makes the model write a known text, so that streaming and
stop strings are checked on text that splits characters and stop strings across tokens.
"""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rosetta
from rosetta.generation.engine import Engine
from rosetta.generation.sampling import SamplingParams, warp
from rosetta.generation.streaming import TextStream
from rosetta.generation.tasks import complete, request

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return rosetta.create("tiny-lm").eval()


def forcing(lm, text: str, then_eos: bool = True):
    """A logits processor that makes the model write `text` (byte tokens), then end-of-sequence."""
    target = lm.tokenizer.encode(text, add_special_tokens=False) + ([lm.stop_ids()[0]] if then_eos else [])
    prompt_length = {}

    def force(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        start = prompt_length.setdefault("n", len(ids))
        step = len(ids) - start
        forced = torch.full_like(logits, -torch.inf)
        forced[target[min(step, len(target) - 1)]] = 0
        return forced

    return force


MULTIBYTE = "héllo 東京 🎉 naïve"


def test_streaming_never_splits_a_character(lm):
    deltas = list(lm.stream("x", max_new_tokens=64, logits_processors=[forcing(lm, MULTIBYTE)]))
    assert "".join(deltas) == MULTIBYTE
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) > 5  # text came out as it was made, not at the end


def test_stop_string_spanning_tokens_stops_and_is_not_returned(lm):
    force = forcing(lm, "abc STOP def")
    completion = complete(lm, [lm.tokenizer.encode("x")], 64, stop=["STOP"], logits_processors=[force])[0]
    assert completion.text == "abc "
    assert completion.finish_reason == "stop"
    deltas = list(lm.stream("x", 64, stop=["STOP"], logits_processors=[forcing(lm, "abc STOP def")]))
    assert "".join(deltas) == "abc "


def test_a_partial_stop_string_is_released_when_it_does_not_complete(lm):
    text = "a STO b ST"
    force = forcing(lm, text)
    assert lm.generate("x", 64, stop=["STOP"], logits_processors=[force]) == text


@given(st.text(alphabet="ab\u00e9\u6771 ", max_size=12), st.lists(st.text(alphabet="ab\u00e9 ", min_size=1, max_size=3),
                                                              max_size=3))
@settings(max_examples=150, deadline=None)
def test_text_stream_equals_the_whole_text_cut_at_the_first_stop(text, stops):
    from rosetta.modalities.text import byte_lm_tokenizer

    tokenizer = byte_lm_tokenizer()
    stream = TextStream(tokenizer.decode, stops)
    out = "".join(stream.push(t) for t in tokenizer.encode(text, add_special_tokens=False)) + stream.finish()
    # Generation stops when the first stop string completes ("é" in "aéb" before "aéb" does), cut where the
    # stop strings found by then start.
    ends = (text[:k] for k in range(1, len(text) + 1))
    cut = next((min(p.find(s) for s in stops if s in p) for p in ends if any(s in p for s in stops)), None)
    assert out == (text if cut is None else text[:cut])
    assert stream.stopped == (cut is not None)


def test_eos_stops_and_max_new_tokens_cuts(lm):
    completion = complete(lm, [lm.tokenizer.encode("x")], 64, logits_processors=[forcing(lm, "hi")])[0]
    assert (completion.text, completion.finish_reason) == ("hi", "stop")
    completion = complete(lm, [lm.tokenizer.encode("x")], 3, logits_processors=[forcing(lm, "hello")])[0]
    assert (completion.text, completion.finish_reason, len(completion.tokens)) == ("hel", "length", 3)


def test_same_seed_same_text_and_seeds_differ(lm):
    a = lm.generate("once", 40, temperature=1.0, seed=7)
    assert a == lm.generate("once", 40, temperature=1.0, seed=7)
    assert len({lm.generate("once", 40, temperature=1.0, seed=s) for s in range(4)}) > 1


def test_a_seeded_sample_does_not_depend_on_its_batch(lm):
    prompts = ["one", "a longer prompt"]
    alone = [lm.generate(p, 20, temperature=0.9, top_p=0.95, seed=3) for p in prompts]
    assert lm.generate(prompts, 20, temperature=0.9, top_p=0.95, seed=3) == alone


def test_greedy_is_the_default_without_generation_config(lm):
    assert lm.config.sampling.greedy
    assert lm.generate("abc", 16) == lm.generate("abc", 16)


def test_beam_search_returns_a_scored_sequence(lm):
    completion = complete(lm, [lm.tokenizer.encode("abc")], 10, num_beams=4)[0]
    assert 0 < len(completion.tokens) <= 10
    with pytest.raises(rosetta.InputError, match="beam search"):
        complete(lm, [lm.tokenizer.encode("abc")], 10, num_beams=2, temperature=0.5)


def test_continuous_batching_a_late_request_joins_and_each_equals_alone(lm):
    prompts = [lm.tokenizer.encode(p) for p in ("first prompt", "a much longer second prompt", "3")]
    alone = [complete(lm, [p], 12, ignore_eos=True)[0].tokens for p in prompts]
    engine = Engine(lm, lm.tokenizer.decode, max_batch=2, capacity=8)  # small: it must shift and grow
    with torch.inference_mode():
        first = engine.submit(request(lm, prompts[0], 12, ignore_eos=True))
        for _ in range(5):
            engine.step()
        second = engine.submit(request(lm, prompts[1], 12, ignore_eos=True))  # longer than the clock is old
        third = engine.submit(request(lm, prompts[2], 12, ignore_eos=True))  # waits for a free row
        while engine.busy:
            engine.step()
    assert [first.tokens, second.tokens, third.tokens] == alone
    assert engine.cache.capacity > 8


def test_a_probed_prompt_position_returns_the_logits_a_full_pass_gives_there(lm):
    """Whisper's no-speech probability: the logits after a prompt position, read in the prefill itself, in a
    batch whose prompts differ in length (left padding) and where one row probes nothing."""
    prompts = [lm.tokenizer.encode(p) for p in ("a much longer first prompt", "short", "no probe")]
    probes = [3, len(prompts[1]) - 1, None]
    engine = Engine(lm, lm.tokenizer.decode, max_batch=3)
    with torch.inference_mode():
        rows = [engine.submit(dataclasses.replace(request(lm, p, 4), probe=q)) for p, q in zip(prompts, probes)]
        while engine.busy:
            engine.step()
        for p, q, row in zip(prompts, probes, rows):
            if q is None:
                assert row.completion().probe_logits is None
                continue
            full = lm(torch.tensor([p]))[0, q].float()
            torch.testing.assert_close(row.completion().probe_logits, full, rtol=1e-4, atol=1e-4)
    with pytest.raises(rosetta.InputError, match="probe"):
        engine.submit(dataclasses.replace(request(lm, prompts[1], 4), probe=len(prompts[1])))


def test_a_cancelled_sequence_stops_and_frees_its_row(lm):
    engine = Engine(lm, lm.tokenizer.decode, max_batch=2)
    with torch.inference_mode():
        keep = engine.submit(request(lm, lm.tokenizer.encode("keep"), 30, ignore_eos=True))
        drop = engine.submit(request(lm, lm.tokenizer.encode("drop"), 30, ignore_eos=True))
        engine.step()
        engine.step()
        drop.cancel()
        while engine.busy:
            engine.step()
    assert drop.finish_reason == "cancelled" and len(drop.tokens) < 30
    assert keep.finish_reason == "length" and len(keep.tokens) == 30


def test_prompt_longer_than_the_context_is_refused_unless_truncation_is_asked(lm):
    long = "x" * (lm.context_length + 10)
    with pytest.raises(rosetta.InputError, match="context window is 512"):
        lm.generate(long, 4)
    assert isinstance(lm.generate(long, 4, truncate=True), str)


def test_generation_stops_at_the_end_of_the_context(lm):
    prompt = lm.tokenizer.encode("y" * (lm.context_length - 5))
    completion = complete(lm, [prompt], 100, ignore_eos=True)[0]
    assert completion.finish_reason == "length" and len(completion.tokens) == 5


def test_bad_sampling_parameters_are_input_errors(lm):
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"repetition_penalty": 0}):
        with pytest.raises(rosetta.InputError):
            lm.generate("a", 2, **bad)


def test_chat_uses_the_template_and_stream_takes_a_conversation(lm):
    messages = [{"role": "user", "content": "hi"}]
    ids = lm.chat_prompt(messages)
    rendered = lm.tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert lm.chat(messages, 10) == "".join(lm.stream(messages, 10))
    with pytest.raises(rosetta.InputError, match="role"):
        lm.chat([{"role": "wizard", "content": "x"}])


# The sampling transformations against transformers' own warpers.


@given(st.integers(0, 2**31 - 1), st.floats(0.1, 2.0), st.integers(0, 40), st.floats(0.05, 1.0), st.floats(0.0, 0.5))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_warping_matches_transformers(seed, temperature, top_k, top_p, min_p):
    pytest.importorskip("transformers")
    from transformers.generation import logits_process as lp

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3
    theirs = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        theirs = lp.TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = lp.TopPLogitsWarper(top_p)(None, theirs)
    if min_p > 0:
        theirs = lp.MinPLogitsWarper(min_p)(None, theirs)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    mine = warp(logits.clone(), [params] * 3)
    assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
    kept = ~torch.isinf(mine)
    torch.testing.assert_close(mine[kept], theirs[kept])


def test_repetition_penalty_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from rosetta.generation.sampling import penalize_repetition

    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([[3, 5, 5, 9, 20]])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    mine = logits.clone()[0]
    penalize_repetition(mine, seen[0], 1.3)
    torch.testing.assert_close(mine, theirs[0])


# JSON-schema-constrained decoding: the output always parses and validates, even from random weights.


_LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 1000)),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10}, st.integers(-5, 5)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
    st.just({"type": "boolean"}),
    st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=4), min_size=1, max_size=4, unique=True).map(
        lambda values: {"enum": values}),
)


def _object(children):
    names = st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=5), min_size=1, max_size=3, unique=True)
    return names.flatmap(lambda keys: st.tuples(st.just(keys), st.lists(children, min_size=len(keys),
                                                                      max_size=len(keys)), st.data())).map(
        lambda t: {"type": "object", "properties": dict(zip(t[0], t[1])),
                   "required": t[2].draw(st.lists(st.sampled_from(t[0]), unique=True)),
                   "additionalProperties": False})


SCHEMAS = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        _object(children),
        st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, children, st.integers(0, 3)),
    ),
    max_leaves=6,
).filter(lambda s: s.get("type") in ("object", "array"))


@given(SCHEMAS, st.integers(0, 1000))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_constrained_output_always_parses_and_validates(lm, schema, seed):
    completion = complete(lm, [lm.tokenizer.encode("JSON:")], 400, json_schema=schema, temperature=1.0,
                          seed=seed)[0]
    assert completion.finish_reason == "stop", completion.text
    jsonschema.validate(json.loads(completion.text), schema)


def test_constrained_greedy_output_validates(lm):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    text = lm.generate("person:", 200, json_schema=schema)
    jsonschema.validate(json.loads(text), schema)


def test_a_schema_that_does_not_compile_is_a_clear_error(lm):
    from rosetta.generation.constraints import SchemaError

    for schema, reason in [({"type": "nonsense"}, "nonsense"), ({"$ref": "#/nope"}, "nope"), ("{bad", "not valid JSON"),
                           ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum")]:
        with pytest.raises(SchemaError, match=reason):
            lm.generate("x", 5, json_schema=schema)


def test_the_threaded_decode_product_equals_the_plain_one():
    import torch.nn.functional as F

    from rosetta.nn.linear import fast_linear

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight, bias = torch.randn(96, 40), torch.randn(96)
        for shape in [(1, 40), (3, 1, 40), (8, 1, 40), (16, 40), (2, 9, 40)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(fast_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        x, weight = x.bfloat16(), weight.bfloat16()
        torch.testing.assert_close(fast_linear(x, weight), F.linear(x, weight))
    finally:
        torch.set_num_threads(threads)


# Regressions found in review.


def test_a_vanishing_temperature_is_greedy_not_an_overflow(lm):
    assert lm.generate("abc", 12, temperature=1e-39, seed=1) == lm.generate("abc", 12, temperature=0)


def test_a_failing_row_ends_alone_and_its_batch_goes_on(lm):
    def broken(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise ValueError("this processor always fails")

    engine = Engine(lm, lm.tokenizer.decode, max_batch=2)
    with torch.inference_mode():
        good = engine.submit(request(lm, lm.tokenizer.encode("good"), 10, ignore_eos=True))
        bad = engine.submit(request(lm, lm.tokenizer.encode("bad"), 10, logits_processors=[broken]))
        while engine.busy:
            engine.step()
    assert bad.finish_reason == "error" and isinstance(bad.error, ValueError)
    assert good.finish_reason == "length" and good.tokens == complete(lm, [good.request.prompt], 10,
                                                                      ignore_eos=True)[0].tokens
    with pytest.raises(ValueError, match="always fails"):
        lm.generate("x", 4, logits_processors=[broken])


def test_rotary_frequencies_stay_fp32_in_a_bf16_model():
    model = rosetta.create("tiny-lm").to(torch.bfloat16)
    assert model.rope.inv_freq.dtype == torch.float32
    cos, _ = model.rope(torch.tensor([[3000]]), torch.bfloat16)
    exact, _ = rosetta.create("tiny-lm").rope(torch.tensor([[3000]]), torch.float32)
    torch.testing.assert_close(cos.float(), exact, atol=1e-2, rtol=0)


def test_a_stop_string_completed_by_the_held_back_tail_is_cut():
    from rosetta.modalities.text import byte_lm_tokenizer

    tokenizer = byte_lm_tokenizer()
    stream = TextStream(tokenizer.decode, [" \u20ac"])
    ids = tokenizer.encode("Hello \u20ac", add_special_tokens=False)[:-1]  # "€" cut after two of its bytes
    out = "".join(stream.push(t) for t in ids)
    assert "\ufffd" not in out
    stream = TextStream(tokenizer.decode, [" "])
    out = "".join(stream.push(t) for t in ids) + stream.finish()
    assert out == "Hello" and stream.stopped


def _compiled_graphs_and_breaks() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_compiled_decoding_gives_the_eager_tokens_without_recompiling_each_step():
    """torch.compile'd decode steps: a late request joining (a masked window), the cache shifting and growing,
    rows finishing; the tokens are eager's, and the steps reuse a few whole graphs instead of compiling each."""
    torch.manual_seed(0)
    model = rosetta.create("tiny-lm").eval()
    prompts = [model.tokenizer.encode(p) for p in ("first prompt", "a much longer second prompt", "3", "four")]
    alone = [complete(model, [p], 12, ignore_eos=True)[0].tokens for p in prompts]
    graphs, breaks = _compiled_graphs_and_breaks()
    engine = Engine(model, model.tokenizer.decode, max_batch=3, capacity=8, compile=True)
    with torch.inference_mode():
        first = engine.submit(request(model, prompts[0], 12, ignore_eos=True))
        for _ in range(5):
            engine.step()
        later = [engine.submit(request(model, p, 12, ignore_eos=True)) for p in prompts[1:]]  # 3 rows, one waits
        steps = 0
        while engine.busy:
            engine.step()
            steps += 1
    assert [first.tokens, *(s.tokens for s in later)] == alone
    new_graphs, new_breaks = _compiled_graphs_and_breaks()
    assert engine.decoder is not model and new_breaks == breaks  # whole graphs, no eager pieces
    assert steps >= 20 and 1 <= new_graphs - graphs <= 6  # one row or more, masked or not, ...


def test_compiled_int8_decoding_computes_the_eager_logits():
    """Both runs are forced along the same tokens, so that every step's logits can be compared: equal up to the
    rounding of fused kernels, which int8's activation quantisation can magnify by a step of its grid."""
    from rosetta.nn.quantize import quantize

    torch.manual_seed(0)
    model = quantize(rosetta.create("tiny-lm").eval())
    prompts = [model.tokenizer.encode(p) for p in ("hello there", "a much longer prompt than the first one")]
    forced = model.tokenizer.encode("forced text", add_special_tokens=False)

    def run(compile: bool) -> list[list[torch.Tensor]]:
        seen: list[list[torch.Tensor]] = [[] for _ in prompts]

        def recorder(rows: list[torch.Tensor]):
            def record(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
                rows.append(logits.clone())
                choice = torch.full_like(logits, -torch.inf)
                choice[forced[len(rows) - 1]] = 0
                return choice
            return record

        engine = Engine(model, model.tokenizer.decode, max_batch=2, compile=compile)
        requests = [request(model, p, len(forced), ignore_eos=True, logits_processors=[recorder(rows)])
                    for p, rows in zip(prompts, seen)]
        with torch.inference_mode():
            completions = engine.generate(requests)
        assert all(c.tokens == forced for c in completions)
        return seen

    eager = run(compile=False)
    graphs, breaks = _compiled_graphs_and_breaks()
    compiled = run(compile=True)
    new_graphs, new_breaks = _compiled_graphs_and_breaks()
    assert new_graphs > graphs and new_breaks == breaks
    for eager_rows, compiled_rows in zip(eager, compiled):
        torch.testing.assert_close(compiled_rows[0], eager_rows[0], rtol=0, atol=0)  # the prefill: eager in both
        for e, c in zip(eager_rows[1:], compiled_rows[1:]):
            assert (c - e).abs().max() <= 5e-3 * e.abs().max()


def test_a_failing_compiler_falls_back_to_eager_decoding(lm, caplog):
    expected = complete(lm, [lm.tokenizer.encode("hello")], 8, ignore_eos=True)[0].tokens
    engine = Engine(lm, lm.tokenizer.decode, max_batch=1)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    engine.decoder = broken  # what compile=True holds, failing as a machine without a toolchain would
    with torch.inference_mode():
        (completion,) = engine.generate([request(lm, lm.tokenizer.encode("hello"), 8, ignore_eos=True)])
    assert completion.tokens == expected and engine.decoder is lm
    assert "compiled decoding failed (RuntimeError: no C++ compiler)" in caplog.text
