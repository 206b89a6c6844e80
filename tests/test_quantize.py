"""int8 inference (`dtype="int8"`): linear layers with int8 weights and dynamically quantised activations,
for every family, close to fp32 and running the same tasks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rosetta
from rosetta.nn.quantize import _PACKED, Int8Linear, quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_int8_linear_is_close_to_its_fp32_layer():
    layer = torch.nn.Linear(256, 512)
    x = torch.randn(3, 7, 256)
    exact, approx = layer(x), Int8Linear.of(layer)(x)
    assert approx.shape == exact.shape
    assert ((approx - exact).norm() / exact.norm()).item() < 0.03
    assert F.cosine_similarity(approx.flatten(), exact.flatten(), dim=0) > 0.999


def test_a_quantised_language_model_keeps_its_logits_and_its_weights(tmp_path):
    torch.manual_seed(0)
    model = rosetta.create("tiny-lm").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        exact = model(ids)
        quantize(model)
        approx = model(ids)
    assert F.cosine_similarity(approx.flatten(), exact.flatten(), dim=0) > 0.99
    assert all(isinstance(m, Int8Linear) for m in (model.blocks[0].attn.qkv, model.blocks[0].mlp.down, model.lm_head))
    kept = model.state_dict()  # embeddings and norms stay; the packed int8 products are not state
    assert kept.keys() < state.keys() and all(torch.equal(kept[k], state[k]) for k in kept)
    with pytest.raises(rosetta.RosettaError, match="int8 model is not saved"):
        model.save_pretrained(tmp_path)
    assert isinstance(model.generate("hello", 8), str)


def test_tied_output_projections_are_quantised_too():
    from rosetta.models.lm import LMConfig

    model = quantize(rosetta.create(LMConfig(vocab_size=300, width=64, layers=1, heads=4, kv_heads=2, mlp_dim=64,
                                             tie_embeddings=True)).eval())
    assert isinstance(model.int8_head, Int8Linear) and model.lm_head is None
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 300)


def test_int8_embeddings_stay_within_cosine_0_99_of_fp32():
    torch.manual_seed(0)
    model = rosetta.create("tiny").eval()
    pixels = torch.rand(4, 3, 32, 32)
    exact_images, exact_texts = model.embed_images(pixels), model.embed_texts(["a dog", "a red square"])
    quantize(model)
    assert (F.cosine_similarity(model.embed_images(pixels), exact_images) > 0.99).all()
    assert (F.cosine_similarity(model.embed_texts(["a dog", "a red square"]), exact_texts) > 0.99).all()


def test_load_and_the_cli_take_int8(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    rosetta.create("tiny-lm").save_pretrained(tmp_path / "lm")
    model = rosetta.load(tmp_path / "lm", dtype="int8")
    assert isinstance(model.blocks[0].attn.qkv, Int8Linear)
    out = subprocess.run([sys.executable, "-m", "rosetta", "generate", "--model", str(tmp_path / "lm"), "--dtype",
                          "int8", "hi", "--max-new-tokens", "4"], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_a_vision_language_model_quantises_whole():
    torch.manual_seed(0)
    model = rosetta.create("tiny-vlm").eval()
    ids = torch.tensor([[257] + [259] * 16 + [10, 20, 30]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        exact = model(ids, pixels)
        quantize(model)
        approx = model(ids, pixels)
    assert isinstance(model.projector.fc1, Int8Linear) and isinstance(model.vision.transformer.blocks[0].mlp.fc1,
                                                                      Int8Linear)
    assert F.cosine_similarity(approx.flatten(), exact.flatten(), dim=0) > 0.99


def test_a_rows_int8_product_does_not_depend_on_the_rows_beside_it():
    """An image's embedding, a sequence's next token: the same alone as in any batch (per-row scales)."""
    layer = Int8Linear.of(torch.nn.Linear(96, 64))
    x = torch.randn(300, 96) * torch.logspace(-2, 2, 300)[:, None]  # rows of very different sizes
    with torch.no_grad():  # 300 rows run oneDNN's kernel, 5 fbgemm's: the same integers, fp32 rounding apart
        together = layer(x)
        torch.testing.assert_close(together[:5], layer(x[:5]), rtol=1e-6, atol=0)
        torch.testing.assert_close(together[299:], layer(x[299:]), rtol=1e-6, atol=0)
        fbgemm = _PACKED[layer._handle][0]
        per_tensor = torch.ops.quantized.linear_dynamic(x, fbgemm, True)[:5]  # what one scale would give
        assert not torch.allclose(per_tensor + layer._bias, layer(x[:5]), rtol=1e-3)
    model = quantize(rosetta.create("tiny").eval())
    pixels = torch.rand(6, 3, 32, 32)
    assert torch.equal(model.embed_images(pixels)[:2], model.embed_images(pixels[:2]))


def test_int8_generation_batched_equals_each_alone():
    torch.manual_seed(0)
    model = quantize(rosetta.create("tiny-lm").eval())
    prompts = ["hello there", "a much longer prompt than the first one", "x"]
    together = model.generate(prompts, 24)
    assert together == [model.generate(p, 24) for p in prompts]


@pytest.mark.parametrize("flags,contrastive,lm", [
    ("avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8", "bf16", torch.bfloat16),  # AMX Xeon
    ("avx2 avx512f avx512_bf16 avx512_vnni", "int8", torch.bfloat16),  # AVX512-BF16 EPYC: int8 beats bf16 there
    ("avx2 fma", "int8", torch.float32),  # AVX2 EPYC: bf16 is emulated, 6x slower than fp32
])
def test_auto_picks_each_cpu_kinds_fastest_path(monkeypatch, flags, contrastive, lm):
    from rosetta.models import io

    monkeypatch.setattr(io, "cpuinfo", lambda field: flags if field == "flags" else "")
    clip = io.place(rosetta.create("tiny"), "cpu", "auto")
    assert ("int8" if getattr(clip, "quantized", False) else "bf16") == contrastive
    if contrastive == "bf16":
        assert clip.dtype == torch.bfloat16
    assert io.place(rosetta.create("tiny-lm"), "cpu", "auto").dtype == lm


def test_an_int8_layer_copied_or_unpickled_outlives_its_original():
    import copy
    import gc
    import pickle

    layer = Int8Linear.of(torch.nn.Linear(16, 8))
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x)
        copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
        assert len({layer._handle, *(c._handle for c in copies)}) == 3
        handles = [c._handle for c in copies]
        del layer
        gc.collect()
        assert all(torch.equal(c(x), expected) for c in copies)
    del copies
    gc.collect()
    assert not set(handles) & set(_PACKED)  # freed with their layers
