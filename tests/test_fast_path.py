"""The encoders' fast paths compute what the plain formulation computes: QuickGELU with its scalings moved onto
the matrix products, the patch projection as a matrix product, the last block run for the pooled token only, a
causal text tower stopped at the longest text, and attention as plain products while training on a CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rosetta
from rosetta.models.encoders import PatchEmbed
from rosetta.nn.lora import add_lora
from rosetta.nn.transformer import MLP, QuickGELU, Transformer, attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a.float() - b.float()).abs().max().item() <= atol


@pytest.mark.parametrize("grad", [False, True])
def test_quick_gelu_mlp_is_fc2_of_quick_gelu_of_fc1(grad):
    mlp = MLP(48, 192, "quick_gelu")
    x = torch.randn(3, 7, 48, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        fused = mlp(x)
        plain = mlp.fc2(QuickGELU()(mlp.fc1(x)))
    _close(fused, plain, 1e-5)
    if grad:
        grads = torch.autograd.grad(fused.square().sum(), [x, mlp.fc1.weight, mlp.fc2.bias])
        expected = torch.autograd.grad(plain.square().sum(), [x, mlp.fc1.weight, mlp.fc2.bias])
        for got, want in zip(grads, expected):
            _close(got, want, 1e-5)


def test_quick_gelu_mlp_in_bf16_and_with_adapters():
    mlp = MLP(64, 256, "quick_gelu")
    x = torch.randn(4, 64)
    with torch.inference_mode():
        reference = mlp.fc2(QuickGELU()(mlp.fc1(x)))
        _close(mlp.to(torch.bfloat16)(x.bfloat16()), reference, 0.02)
    mlp = MLP(64, 256, "quick_gelu")
    base = mlp.fc1.weight.detach().clone(), mlp.fc1.bias.detach().clone()
    add_lora(mlp, targets=("fc1",), rank=4, alpha=8)  # not a plain Linear any more: the generic path
    torch.nn.init.normal_(mlp.fc1.lora_b)
    lora = mlp.fc1
    with torch.inference_mode():
        h = F.linear(x, *base) + lora.scale * (x @ lora.lora_a.t() @ lora.lora_b.t())
        _close(mlp(x), F.linear(h * torch.sigmoid(1.702 * h), mlp.fc2.weight, mlp.fc2.bias), 1e-5)


@pytest.mark.parametrize("shape,patch", [((2, 3, 64, 64), 16), ((1, 3, 70, 45), 16), ((2, 1, 32, 100), 8)])
def test_patch_embed_is_the_strided_convolution(shape, patch):
    embed = PatchEmbed(shape[1], 24, patch)
    x = torch.randn(*shape, requires_grad=True)
    ours, conv = embed(x), F.conv2d(x, embed.weight, embed.bias, stride=patch)
    _close(ours, conv, 1e-5)
    assert ours.flatten(2).transpose(1, 2).is_contiguous()  # tokens without a copy
    _close(torch.autograd.grad(ours.square().sum(), x)[0], torch.autograd.grad(conv.square().sum(), x)[0], 1e-5)


@pytest.mark.parametrize("causal,layers,checkpointed", [(False, 3, False), (True, 3, False), (True, 2, True),
                                                     (False, 0, False)])
def test_last_block_for_the_pooled_rows_only(causal, layers, checkpointed):
    tower = Transformer(32, layers, 4, 64, "quick_gelu", 1e-5)
    tower.gradient_checkpointing = checkpointed
    x = torch.randn(5, 9, 32, requires_grad=True)
    rows = torch.tensor([0, 8, 3, 5, 0])
    picked = tower(x, causal=causal, rows=rows)
    full = tower(x, causal=causal)[torch.arange(5), rows].unsqueeze(1)
    _close(picked, full, 1e-5)
    _close(torch.autograd.grad(picked.sum(), x)[0], torch.autograd.grad(full.sum(), x)[0], 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_training_attention_is_sdpa(causal):
    q, k, v = (torch.randn(2, 4, 11, 16, requires_grad=True) for _ in range(3))
    ours = attention(q, k, v, causal=causal)  # grad mode on a CPU: the plain products
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    _close(ours, reference, 1e-5)
    for got, want in zip(torch.autograd.grad(ours.square().sum(), [q, k, v]),
                         torch.autograd.grad(reference.square().sum(), [q, k, v])):
        _close(got, want, 1e-5)


def test_text_embedding_does_not_depend_on_the_padding_run():
    model = rosetta.create("tiny").eval()
    texts = ["a red circle", "a large blue square on the left of a small green triangle", "x"]
    with torch.inference_mode():
        together = model.embed_texts(texts)
        alone = torch.cat([model.embed_texts([t]) for t in texts])
        ids = model.tokenize(texts)
        tokens = model.text.tokens(ids)  # every one of the context's positions, padding included
        full = tokens[torch.arange(len(texts)), model.text.pooled_positions(ids)]
        pooled = model.text(ids)
    _close(together, alone, 1e-5)
    _close(pooled, full, 1e-5)


def test_clip_presets_tokenize_as_open_clip_offline():
    open_clip = pytest.importorskip("open_clip")
    texts = ["a photo of a dog on the beach", "Hello,   World! It's 3.14 o'clock", "naïve café — 日本語 🚀",
             "don't we'll they're I'm", "&amp; html &lt;b&gt;", "", "the quick brown fox " * 30]
    ours = rosetta.create("vit-b-32").tokenize(texts)
    assert torch.equal(ours, open_clip.get_tokenizer("ViT-B-32")(texts))


def test_freed_memory_is_kept_unless_asked_not_to():
    import subprocess
    import sys

    from rosetta.models.io import keep_freed_memory

    assert keep_freed_memory() is True  # glibc: these tests run on Linux
    code = "from rosetta.models.io import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "ROSETTA_KEEP_FREED_MEMORY": "0"})
    assert out.stdout.strip() == "False", out.stderr


RELEASE_CHECK = """
import os, time, torch
from rosetta.models.io import release_openmp_threads
torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
alone = threads()
torch.ones(1 << 22).mul_(2)  # large enough to run as a parallel region: this thread's team starts
team = threads()
released = release_openmp_threads()
deadline = time.monotonic() + 10
while threads() > alone and time.monotonic() < deadline:
    time.sleep(0.01)
after = threads()
torch.ones(1 << 22).mul_(2)
print(alone, team, released, after, threads())
"""


def test_the_loading_threads_openmp_team_can_be_released():
    """A server's model runs on its worker thread; the idle team left by the thread that loaded it is ended (it
    made libgomp put the worker's team to sleep between parallel regions), and starts again if needed."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RELEASE_CHECK], capture_output=True, text=True, timeout=120)
    alone, team, released, after, again = out.stdout.split()
    assert int(team) == int(alone) + 1, out.stdout  # two threads: this one and one more
    assert released == "True" and int(after) == int(alone)
    assert int(again) == int(team)
