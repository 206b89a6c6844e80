"""Contrastive losses: equal to open_clip's on the same features, and exact across ranks with gradients."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rosetta.train.distributed import World
from rosetta.train.losses import clip_loss, contrastive_loss, siglip_loss


def features(n: int = 16, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g), dim=-1),
            F.normalize(torch.randn(n, dim, generator=g), dim=-1))


def test_clip_loss_equals_open_clip():
    from open_clip.loss import ClipLoss

    image, text = features()
    scale = torch.tensor(math.log(1 / 0.07))
    ours = clip_loss(image, text, scale)
    theirs = ClipLoss()(image, text, scale.exp())
    assert abs(ours.item() - theirs.item()) <= 1e-5


def test_siglip_loss_equals_open_clip():
    from open_clip.loss import SigLipLoss

    image, text = features()
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    ours = siglip_loss(image, text, scale, bias)
    theirs = SigLipLoss()(image, text, scale.exp(), bias)
    assert abs(ours.item() - theirs.item()) <= 1e-5


def test_perfect_alignment_gives_low_clip_loss():
    image, _ = features()
    high = clip_loss(image, image.roll(1, dims=0), torch.tensor(math.log(100.0)))
    low = clip_loss(image, image, torch.tensor(math.log(100.0)))
    assert low < 0.01 < high


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_grads(rank: int, size: int, port: int, kind: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    image, text = features()
    n = image.shape[0] // size
    image = image[rank * n : (rank + 1) * n].clone().requires_grad_()
    text = text[rank * n : (rank + 1) * n].clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = contrastive_loss(kind, image, text, scale, bias, World(rank, size))
    loss.backward()
    queue.put((rank, loss.item(), image.grad.numpy(), text.grad.numpy(), scale.grad.item()))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_two_ranks_match_one_process(kind):
    """Mean of rank losses = the global-batch loss; each rank's feature gradients = the number of ranks times that
    slice of the global gradient, which DDP's averaging of parameter gradients divides out again."""
    image, text = features()
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = contrastive_loss(kind, image, text, scale, torch.tensor(-10.0, requires_grad=True))
    loss.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_grads, args=(r, 2, port, kind, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert sum(r[1] for r in results) / 2 == pytest.approx(loss.item(), abs=1e-5)
    n = image.shape[0] // 2
    for rank, _, image_grad, text_grad, _ in results:
        rows = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(torch.from_numpy(image_grad), 2 * image.grad[rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(text_grad), 2 * text.grad[rows], atol=1e-5, rtol=1e-4)
    assert sum(r[4] for r in results) / 2 == pytest.approx(scale.grad.item(), abs=1e-5)


def test_the_cpu_peak_is_measured_in_the_dtype_and_says_so():
    from rosetta.train.flops import describe_peak, peak_flops

    cpu = torch.device("cpu")
    fp32 = peak_flops(cpu, torch.float32)
    assert fp32 > 1e9 and peak_flops(cpu, torch.float32) == fp32  # measured once, then remembered
    assert "measured" in describe_peak(cpu, torch.float32) and "float32" in describe_peak(cpu, torch.float32)
    assert peak_flops(cpu, torch.bfloat16) != fp32  # its own dtype's figure, not fp32's relabelled


def test_fused_adamw_takes_the_per_tensor_loops_steps():
    """The contrastive trainer's fused AdamW and torch's per-tensor loop: groups of their own learning rate and
    decay, a warm-up schedule, a parameter without a gradient on some steps; the same weights to rounding."""
    torch.manual_seed(0)
    shapes = [(96, 48), (192, 48), (48,), (1,)]
    start = [torch.randn(s) * 0.02 for s in shapes]
    weights, optimizers = [], []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:2], "weight_decay": 0.1, "lr": 1e-3},
                  {"params": params[2:], "weight_decay": 0.0, "lr": 5e-4}]
        optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
        weights.append(params)
        optimizers.append((optimizer, schedule))
    for step in range(100):
        grads = [torch.randn(s) for s in shapes]
        for params in weights:
            for p, g in zip(params, grads):
                p.grad = None if (step % 7 == 3 and p.ndim == 1 and p.numel() == 1) else g.clone()
        for optimizer, schedule in optimizers:
            optimizer.step()
            schedule.step()
    for plain, fused, initial in zip(*weights, start):
        assert (plain - initial).abs().max() > 1e-4  # they moved (steps of up to 1e-3, random signs)
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)
