"""Training-step throughput: Rosetta vs open_clip on the same ViT-B/32 CLIP, random weights and data, one process.

    python benchmarks/train.py [--batch-size 16] [--steps 3]

Both models start from the same weights (open_clip's, converted), take AdamW steps on the same
batches, and print samples/s: open_clip in fp32 and with bf16 autocast (its fast path), Rosetta in
fp32, bf16 autocast and its fast path (`precision: bf16-true`, bf16 weights with fp32 master weights, where
the hardware multiplies bf16 natively; else fp32). Each uses torch's AdamW as its trainer builds it (Rosetta's
contrastive trainer: fused; open_clip's script: the default). It
also checks that the fp32 losses of the two match step by step, and prints Rosetta's MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import rosetta
from rosetta.convert import open_clip as oc
from rosetta.convert.mapping import to_ours
from rosetta.models.io import cpu_has_fast_bf16, cpu_isa, cpuinfo, keep_freed_memory
from rosetta.train.flops import describe_peak, peak_flops, train_flops
from rosetta.train.loop import MasterWeights
from rosetta.train.losses import clip_loss
from rosetta.train.trainer import Trainer

FUSED = Trainer.fused_adamw or None  # the contrastive trainer's AdamW: fused (open_clip's script: torch's default)


def open_clip_config() -> rosetta.ContrastiveConfig:
    import json
    import tempfile
    from pathlib import Path

    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"model_cfg": open_clip.get_model_config("ViT-B-32-quickgelu")}
        (Path(tmp) / oc.CONFIG_FILE).write_text(json.dumps(cfg))
        return oc.read_config(Path(tmp))


def interleaved(contenders: dict[str, tuple], batches) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Samples/s and losses of each `name: (step, autocast dtype or None)`, taking one step of each in turn (the
    first one untimed, a warm-up), so drift in the machine's speed hits all alike."""
    losses: dict[str, list[float]] = {name: [] for name in contenders}
    seconds = dict.fromkeys(contenders, 0.0)
    for i, batch in enumerate(batches):
        for name, (step, dtype) in contenders.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                losses[name].append(step(*batch))
            if i:
                seconds[name] += time.perf_counter() - start
    samples = (len(batches) - 1) * batches[0][0].shape[0]
    return {name: samples / s for name, s in seconds.items()}, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each (after one warm-up step)")
    args = parser.parse_args()

    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    initial_peer = {k: v.clone() for k, v in open_clip.create_model("ViT-B-32-quickgelu").state_dict().items()}
    config = open_clip_config()

    def fresh_ours() -> rosetta.ContrastiveModel:
        with torch.device("meta"):
            model = rosetta.ContrastiveModel(config)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        model.load_state_dict(to_ours(oc.rules(config, set(initial_peer)), initial_peer, shapes, "open_clip"),
                              assign=True)
        return model.train()

    def fresh_peer():
        model = open_clip.create_model("ViT-B-32-quickgelu")
        model.load_state_dict(initial_peer)
        return model.train()

    batches = [(torch.randn(args.batch_size, 3, 224, 224), torch.randint(1, 49406, (args.batch_size, 77)))
               for _ in range(args.steps + 1)]
    for _, ids in batches:
        ids[:, -1] = 49407  # end-of-text, pooled by both

    def ours_step(model, optimizer):
        def step(pixels, ids):
            image, text, scale, _ = model(pixels, ids)
            loss = clip_loss(image.float(), text.float(), scale.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        return step

    def bf16_true_step(model):
        """`precision: bf16-true` as the trainer runs it: bf16 model, fp32 master weights in AdamW."""
        masters = MasterWeights(model)
        optimizer = torch.optim.AdamW([masters.of(p) for p in model.parameters()], lr=1e-5, fused=FUSED)

        def step(pixels, ids):
            image, text, scale, _ = model(pixels, ids)
            loss = clip_loss(image.float(), text.float(), scale.float())
            loss.backward()
            masters.take_grads()
            optimizer.step()
            masters.copy_to_model()
            return loss.item()
        return step

    def peer_step(model, optimizer):
        criterion = ClipLoss()

        def step(pixels, ids):
            image, text, scale = model(pixels, ids)[:3]
            loss = criterion(image, text, scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        return step

    def adamw(model, fused=None):  # torch's AdamW, as each training script builds it (None: torch's default)
        return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)

    fast = torch.bfloat16 if cpu_has_fast_bf16() else None
    print(f"threads: {torch.get_num_threads()}, cpu: {cpuinfo('model name') or '?'} ({cpu_isa()}), native bf16: "
          f"{cpu_has_fast_bf16()}, Rosetta fast path: {'bf16-true' if fast else 'fp32'}, "
          f"freed memory kept (both sides, one process): {keep_freed_memory()}")
    print(f"ViT-B/32 CLIP, batch {args.batch_size}, {args.steps} timed steps each\n")

    contenders = {
        "rosetta fp32": (ours_step(m := fresh_ours(), adamw(m, FUSED)), None),
        "open_clip fp32": (peer_step(m := fresh_peer(), adamw(m)), None),
        "open_clip bf16 autocast": (peer_step(m := fresh_peer(), adamw(m)), torch.bfloat16),
    }
    if fast:
        contenders["rosetta bf16 autocast"] = (ours_step(m := fresh_ours(), adamw(m, FUSED)), fast)
        contenders["rosetta bf16-true"] = (bf16_true_step(fresh_ours()), None)
    speeds, losses = interleaved(contenders, batches)
    for name, value in speeds.items():
        print(f"{name:26s} {value:7.2f} samples/s")
    ours, theirs = losses["rosetta fp32"], losses["open_clip fp32"]
    print("fp32 losses, step by step:")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        print(f"  step {i}: rosetta {a:.6f}  open_clip {b:.6f}")
    print(f"max |difference|: {max(abs(a - b) for a, b in zip(ours, theirs)):.2e}")
    if fast:
        true = losses["rosetta bf16-true"]
        print(f"bf16-true losses - fp32's: max {max(abs(a - b) for a, b in zip(true, ours)):.4f}")
    ours_fast = speeds["rosetta bf16-true" if fast else "rosetta fp32"]
    peer_bf16, peer_fp32 = speeds["open_clip bf16 autocast"], speeds["open_clip fp32"]
    print(f"\nrosetta fast path vs open_clip bf16 autocast: x{ours_fast / peer_bf16:.2f}; "
          f"vs open_clip fp32: x{ours_fast / peer_fp32:.2f}")
    peak = peak_flops(torch.device("cpu"), fast or torch.float32)
    mfu = train_flops(config) * ours_fast / peak
    print(f"\nRosetta MFU (fast path): {mfu:.1%} of this CPU's {peak / 1e9:.0f} GFLOP/s peak "
          f"({describe_peak(torch.device('cpu'), fast or torch.float32)})")


if __name__ == "__main__":
    main()
