"""Audio embedding throughput: Rosetta vs transformers on the same random-weights model, one process.

    python benchmarks/audio.py [--only clap] [--batch-size 16] [--repeats 5] [--threads N]

clap: transformers' ClapModel.get_audio_features against Rosetta's ClapModel.encode_audio (normalised) on a
clap-htsat-unfused-sized model (HTSAT-base, 256 x 256 spectrogram image, random weights), a batch of 10-second
clips' features (the extractor's cost is the same for both and is left out). Each runs its fastest path on
this CPU: transformers in fp32 (and bf16 where the CPU multiplies bf16 natively), Rosetta in fp32, bf16 where
native, and int8 (`dtype="int8"`, rosetta.nn.quantize). It prints clips/s, the ratio to transformers' fastest
path, and the cosine between each path's embeddings and transformers' fp32 ones, with the CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rosetta.models.io import cpu_has_fast_bf16, cpu_isa, cpuinfo, place


def throughputs(contenders: dict[str, Callable[[], torch.Tensor]], items: int, repeats: int) -> dict[str, float]:
    """Items/s of each `name: fn`, timed in interleaved rounds (one call of each per round) and taken at the
    median round, so drift in the machine's speed (turbo, other load) hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up: kernel selection, allocator
        for _ in range(repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    return {name: items / statistics.median(times) for name, times in seconds.items()}


def report(unit: str, results: dict[str, float], embeddings: dict[str, torch.Tensor], peer: str) -> None:
    """Throughputs, the ratio to the peer's fastest path, and each path's cosine to the peer's fp32 output."""
    best = max(value for name, value in results.items() if name.startswith(peer))
    reference = embeddings[f"{peer} fp32"]
    for name, value in results.items():
        cosine = F.cosine_similarity(embeddings[name].float(), reference, dim=-1).min()
        print(f"{unit:8s} {name:26s} {value:7.2f}   x{value / best:.2f} vs the fastest {peer}   "
              f"cosine to {peer} fp32 >= {cosine:.5f}")


def clap(batch_size: int, repeats: int) -> None:
    """transformers' ClapModel.get_audio_features vs Rosetta's encode_audio, HTSAT-base, 10-s clips."""
    import transformers

    import rosetta

    torch.manual_seed(0)
    ours = rosetta.create("clap-htsat-unfused").eval()
    peers = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if cpu_has_fast_bf16() else {})}
    with tempfile.TemporaryDirectory() as directory:  # the same weights in both: Rosetta's, exported
        ours.save_pretrained(directory, format="transformers")
        peers = {name: transformers.ClapModel.from_pretrained(directory, dtype=dtype).eval()
                 for name, dtype in peers.items()}

    features = torch.randn(batch_size, 1, ours.config.features.frames, ours.config.features.n_mels) * 10 - 40
    is_longer = torch.zeros(batch_size, 1, dtype=torch.bool)

    def transformers_path(model):
        return lambda: model.get_audio_features(input_features=features.to(model.dtype), is_longer=is_longer)

    def rosetta_path(model):
        return lambda: F.normalize(model.encode_audio(features, is_longer).float(), dim=-1)

    contenders = {f"transformers {name}": transformers_path(model) for name, model in peers.items()}
    contenders["rosetta fp32"] = rosetta_path(ours)
    for dtype in ("bf16", "int8") if cpu_has_fast_bf16() else ("int8",):
        contenders[f"rosetta {dtype}"] = rosetta_path(place(copy.deepcopy(ours), "cpu", dtype))

    with torch.inference_mode():
        embeddings = {name: _features(fn()) for name, fn in contenders.items()}
    results = throughputs(contenders, batch_size, repeats)
    print(f"clap: HTSAT-base (clap-htsat-unfused sizes, random weights), batch {batch_size} of 10-s clips, "
          f"{repeats} interleaved rounds, median round")
    report("clips/s", results, embeddings, "transformers")
    print()


def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_audio_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


SECTIONS: dict[str, Callable[[int, int], None]] = {"clap": clap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable; default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpuinfo('model name')} ({cpu_isa()}), threads: {torch.get_num_threads()}, "
          f"native bf16: {cpu_has_fast_bf16()}\n")
    for name in args.only or SECTIONS:
        SECTIONS[name](args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
