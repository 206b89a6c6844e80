"""Text generation speed: Rosetta vs transformers' `generate()` on the same random-weights model with
SmolLM2-135M's shape, one process.

    python benchmarks/generate.py [--prompt 128] [--new 128] [--batches 1 8] [--dtypes fp32 bf16 int8]
                                  [--compiled int8]

Both sides get the same 128-token prompts and generate 128 tokens with end-of-sequence ignored, greedy, at
batch 1 and batch 8, in fp32 and bf16; Rosetta also with int8 linear layers (`dtype="int8"`, fbgemm;
transformers has no fast int8 path on a CPU without AMX/VNNI, where torchao's int8 product is 50x slower
than fp32), and for the dtypes in `--compiled` with its decode steps through torch.compile (`compile=True`;
the first steps pay the compilation, reported apart). For each it prints the time to first token (a one-token
generation: the prefill), the decode speed (tokens after the first, per second), and the memory bandwidth the decode
reaches (the weights' bytes, read once per step, times steps per second) beside this machine's copy
bandwidth, which bounds it. Then, per batch size, each side's fastest path against the other's, and
whether Rosetta's fp32 greedy tokens equal transformers' fp32 greedy tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import rosetta
from rosetta.generation.tasks import complete
from rosetta.models.io import cpu_has_fast_bf16, cpu_isa, cpuinfo, resolve_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def copy_bandwidth() -> float:
    """Bytes read plus bytes written per second by a large tensor copy (the bound of a memory-bound decode)."""
    source = torch.empty(256 * 1024 * 1024 // 4)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    return 2 * 10 * source.numel() * 4 / (time.perf_counter() - start)


def smollm2_shaped(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(generate, prompts, new: int, rows: int | None = None) -> tuple[float, float, float, list[list[int]]]:
    """(seconds of the warm-up, seconds to the first token, decode tokens/s, the generated tokens) of
    `generate(prompts, n)`, for `rows` sequences (default: the prompts tensor's first dimension)."""
    warm_up = timed(lambda: generate(prompts, 4))  # kernel selection, allocator; compilation
    first = min(timed(lambda: generate(prompts, 1)) for _ in range(2))
    start = time.perf_counter()
    tokens = generate(prompts, new)
    total = time.perf_counter() - start
    return warm_up, first, (rows or prompts.shape[0]) * (new - 1) / max(total - first, 1e-9), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--new", type=int, default=128, help="tokens generated (default: 128)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--compiled", nargs="*", default=["int8"], choices=list(DTYPES),
                        help="dtypes Rosetta also runs with compile=True (default: int8; eager fp32 and bf16 are "
                             "faster than compiled here, their products being what takes the time)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    isa = cpu_isa()
    print(f"cpu: {cpuinfo('model name') or '?'} ({isa}), threads: {threads}, native bf16: {cpu_has_fast_bf16()}, "
          f"Rosetta's fast path (dtype='auto'): {resolve_dtype('auto', torch.device('cpu'))}")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + written)")

    reference = smollm2_shaped()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        from rosetta.modalities.text import byte_lm_tokenizer

        byte_lm_tokenizer().save(Path(directory))  # a tokenizer to load with; the prompts are ids
        ours = rosetta.load(directory)
        quantised = rosetta.load(directory, dtype="int8") if "int8" in args.dtypes + args.compiled else None
    params = sum(p.numel() for p in ours.parameters())
    print(f"model: SmolLM2-135M's shape, {params / 1e6:.1f}M parameters, random weights; prompt {args.prompt} "
          f"tokens, {args.new} new tokens, end-of-sequence ignored, greedy\n")

    def theirs(prompts: torch.Tensor, n: int) -> list[list[int]]:
        out = reference.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)
        return out[:, prompts.shape[1]:].tolist()

    def mine(prompts: torch.Tensor, n: int, model=ours, compile=False) -> list[list[int]]:
        return [c.tokens for c in complete(model, prompts.tolist(), n, ignore_eos=True, compile=compile)]

    generator = torch.Generator().manual_seed(1)
    print(f"{'':26} {'batch':>5} {'warm-up s':>10} {'first token s':>14} {'decode tok/s':>13} {'GB/s':>6} "
          f"{'of copy':>8}")
    best: dict[tuple[str, int], tuple[float, str]] = {}
    identical: dict[int, bool] = {}
    for batch in args.batches:
        prompts = torch.randint(3, 49152, (batch, args.prompt), generator=generator)
        for dtype_name in dict.fromkeys(args.dtypes + args.compiled):
            dtype = DTYPES[dtype_name]
            model = quantised if dtype == torch.int8 else ours.to(dtype)
            sides = []
            if dtype != torch.int8 and dtype_name in args.dtypes:
                reference.to(dtype)
                sides.append(("transformers", dtype_name, theirs))
            if dtype_name in args.dtypes:
                sides.append(("rosetta", dtype_name, lambda p, n, model=model: mine(p, n, model)))
            if dtype_name in args.compiled:
                sides.append(("rosetta", dtype_name + "+compile", lambda p, n, model=model: mine(p, n, model, True)))
            tokens = {}
            for side, path, generate in sides:
                with torch.inference_mode():
                    warm_up, first, rate, tokens[side, path] = measure(generate, prompts, args.new)
                weight_bytes = params * (1 if dtype == torch.int8 else torch.finfo(dtype).bits // 8)
                achieved = weight_bytes * rate / batch
                print(f"{side + ' ' + path:26} {batch:>5} {warm_up:>10.1f} {first:>14.3f} {rate:>13.1f} "
                      f"{achieved / 1e9:>6.1f} {achieved / bandwidth:>7.0%}", flush=True)
                if rate > best.get((side, batch), (0.0, ""))[0]:
                    best[side, batch] = (rate, path)
            if ("transformers", "fp32") in tokens:
                identical[batch] = all(tokens[key] == tokens["transformers", "fp32"] for key in tokens)
        reference.float()
        ours.float()
    print()
    for batch in args.batches:
        (mine_rate, mine_path), (their_rate, their_path) = best["rosetta", batch], best["transformers", batch]
        print(f"batch {batch}: Rosetta {mine_path} {mine_rate:.1f} tok/s vs transformers {their_path} "
              f"{their_rate:.1f} tok/s (each side's fastest): x{mine_rate / their_rate:.2f}"
              + (f"; fp32 greedy tokens identical: {identical[batch]}" if batch in identical else ""))


if __name__ == "__main__":
    main()
