"""Embedding throughput: Rosetta vs open_clip on the same ViT-B/32 CLIP, random weights, one process.

    python benchmarks/embed.py [--batch-size 32] [--repeats 5]

Prints images/s and texts/s (a short caption, and texts that fill the 77-token context) for open_clip fp32,
Rosetta fp32, and Rosetta's fast path (`dtype="auto"`: bf16 on AMX CPUs, int8 on the others), the paths auto
did not pick, the fast path's image tower through torch.compile (as `rosetta serve --compile` and `rosetta index
--compile` run it; compiled in the warm-up round), the ratios, the CPU, and the cosine similarity between
fast-path and fp32 embeddings.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import rosetta
from rosetta.models.compiled import compile_image_tower
from rosetta.models.io import cpu_has_fast_bf16, cpu_isa, cpuinfo, keep_freed_memory, place


def throughputs(contenders: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Items/s of each `name: (fn, batch)`, timed in interleaved rounds (one batch of each per round) and
    taken at the median round, so drift in the machine's speed (turbo, other load) hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn, batch in contenders.values():
            fn(batch)  # warm-up: kernel selection, allocator
        for _ in range(repeats):
            for name, (fn, batch) in contenders.items():
                start = time.perf_counter()
                fn(batch)
                if batch.is_cuda:
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
    return {name: contenders[name][1].shape[0] / statistics.median(times) for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import open_clip

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peer = open_clip.create_model("ViT-B-32-quickgelu").to(device).eval()
    ours = rosetta.create("vit-b-32").to(device).eval()
    fast = rosetta.create("vit-b-32").eval()
    fast.load_state_dict(ours.state_dict())
    fast = place(fast, device, "auto")
    fast_dtype = "int8" if getattr(fast, "quantized", False) else str(fast.dtype).removeprefix("torch.")

    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    # A caption (9 tokens: Rosetta's causal text tower stops at the longest text in the batch, open_clip runs all
    # 77 positions) and a text that fills the context (the same work for both).
    caption, long_text = "a photo of a dog on the beach", " ".join(["dog"] * 80)
    ids = ours.tokenize([caption] * args.batch_size).to(device)
    peer_ids = open_clip.get_tokenizer("ViT-B-32")([caption] * args.batch_size).to(device)
    long_ids = ours.tokenize([long_text] * args.batch_size).to(device)
    assert torch.equal(long_ids.cpu(), open_clip.get_tokenizer("ViT-B-32")([long_text] * args.batch_size))

    print(f"device: {device}, threads: {torch.get_num_threads()}, cpu: {cpuinfo('model name') or '?'} ({cpu_isa()}), "
          f"native bf16: {cpu_has_fast_bf16()}, fast-path dtype: {fast_dtype}, "
          f"freed memory kept (both sides, one process): {keep_freed_memory()}")
    print(f"batch {args.batch_size}, {args.repeats} interleaved rounds, median round\n")
    image_contenders = {
        "open_clip fp32": (peer.encode_image, images),
        "rosetta fp32": (ours.encode_image, images),
        f"rosetta auto ({fast_dtype})": (fast.encode_image, images),
    }
    text_contenders = {
        "open_clip fp32": (peer.encode_text, peer_ids),
        "rosetta fp32": (ours.encode_text, ids),
        f"rosetta auto ({fast_dtype})": (fast.encode_text, ids),
    }
    long_contenders = {
        "open_clip fp32": (peer.encode_text, long_ids),
        "rosetta fp32": (ours.encode_text, long_ids),
        f"rosetta auto ({fast_dtype})": (fast.encode_text, long_ids),
    }
    for other in ("bf16", "int8"):  # what the paths auto did not pick cost or gain here
        if other == fast_dtype or (other == "int8" and device.type != "cpu"):
            continue
        twin = rosetta.create("vit-b-32").eval()
        twin.load_state_dict(ours.state_dict())
        twin = place(twin, device, other)
        image_contenders[f"rosetta {other} (forced)"] = (twin.encode_image, images)
        text_contenders[f"rosetta {other} (forced)"] = (twin.encode_text, ids)
        long_contenders[f"rosetta {other} (forced)"] = (twin.encode_text, long_ids)
    # `rosetta serve --compile` / `rosetta index --compile`: the fast path's image tower through torch.compile.
    compiled = rosetta.create("vit-b-32").eval()
    compiled.load_state_dict(ours.state_dict())
    compiled = place(compiled, device, "auto")
    compile_image_tower(compiled)
    image_contenders[f"rosetta auto ({fast_dtype}) + compile"] = (compiled.encode_image, images)
    rows = {
        "images/s": throughputs(image_contenders, args.repeats),
        "texts/s": throughputs(text_contenders, args.repeats),
        "77-token texts/s": throughputs(long_contenders, args.repeats),
    }
    for unit, results in rows.items():
        base = results["open_clip fp32"]
        for name, value in results.items():
            print(f"{unit:16s} {name:38s} {value:8.1f}   x{value / base:.2f} vs open_clip fp32")
        print()

    with torch.inference_mode():
        cos_image = F.cosine_similarity(fast.encode_image(images).float(), ours.encode_image(images), dim=-1)
        cos_text = F.cosine_similarity(fast.encode_text(ids).float(), ours.encode_text(ids), dim=-1)
        cos_compiled = F.cosine_similarity(compiled.encode_image(images).float(), ours.encode_image(images), dim=-1)
    print(f"cosine(auto, fp32): images min {cos_image.min():.5f}, texts min {cos_text.min():.5f}; "
          f"cosine(auto + compile, fp32): images min {cos_compiled.min():.5f}")


if __name__ == "__main__":
    main()
