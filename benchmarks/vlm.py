"""Vision-language speed: Rosetta vs transformers' LlavaForConditionalGeneration on the same random-weights
LLaVA-style model (a ViT-B/32-sized CLIP tower at 224 px, 49 image tokens; SmolLM2-135M's shape as the
language model), one process.

    python benchmarks/vlm.py [--question 32] [--new 64] [--batches 1 8] [--dtypes fp32 bf16 int8]
                             [--compiled int8]

Each prompt is one 224 px image and a 32-token question; 64 tokens are generated with end-of-sequence ignored,
greedy. Time to first token is a one-token generation: the image encoding and the prefill. Decode speed is
the tokens after the first, per second. Both sides run fp32 and bf16; Rosetta also int8 (`dtype="int8"`), and
the dtypes in `--compiled` with its decode steps through torch.compile (`compile=True`; the compilation is
paid in the warm-up, reported apart).
Then, per batch size, each side's fastest path against the other's, and whether the fp32 greedy tokens agree.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from generate import measure

import rosetta
from rosetta.generation.tasks import complete
from rosetta.models.io import cpu_has_fast_bf16, cpu_isa, cpuinfo

IMAGE_TOKEN = 49151  # the last id of the vocabulary stands for image patches


def llava_shaped(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=49,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=True)
    return LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", type=int, default=32, help="question tokens (default: 32)")
    parser.add_argument("--new", type=int, default=64, help="tokens generated (default: 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--compiled", nargs="*", default=["int8"], choices=["fp32", "bf16", "int8"],
                        help="dtypes Rosetta also runs with compile=True (default: int8)")
    args = parser.parse_args()

    isa = cpu_isa()
    print(f"cpu: {cpuinfo('model name') or '?'} ({isa}), threads: {torch.get_num_threads()}, "
          f"native bf16: {cpu_has_fast_bf16()}")
    reference = llava_shaped()
    pristine = {k: v.clone() for k, v in reference.state_dict().items()}  # a bf16 round trip rounds the weights
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        from rosetta.modalities.text import byte_lm_tokenizer

        byte_lm_tokenizer().save(Path(directory))  # a tokenizer to load with; the prompts are ids
        fp32 = rosetta.load(directory)
        models = {name: fp32 if name == "fp32" else rosetta.load(directory, dtype=name)
                  for name in dict.fromkeys(args.dtypes + args.compiled)}
    print(f"model: LLaVA-style, ViT-B/32 tower at 224 px ({fp32.config.image_tokens} image tokens) + SmolLM2-135M's "
          f"shape, {fp32.num_params() / 1e6:.1f}M parameters, random weights; one image and {args.question} question "
          f"tokens a prompt, {args.new} new tokens, end-of-sequence ignored, greedy\n")

    def theirs(inputs, n: int) -> list[list[int]]:
        ids, pixels = inputs
        out = reference.generate(input_ids=ids, pixel_values=pixels.to(reference.dtype),
                                 attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        return out[:, ids.shape[1]:].tolist()

    def mine(inputs, n: int, model, compile: bool = False) -> list[list[int]]:
        ids, pixels = inputs
        features = model.encode_images(pixels.to(model.dtype))
        embeds = [model.embed_prompt(row[None], f[None])[0] for row, f in zip(ids, features)]
        return [c.tokens for c in complete(model.lm, ids.tolist(), n, prompt_embeds=embeds, ignore_eos=True,
                                           compile=compile)]

    generator = torch.Generator().manual_seed(1)
    print(f"{'':26} {'batch':>5} {'warm-up s':>10} {'first token s':>14} {'decode tok/s':>13}")
    best: dict[tuple[str, int], tuple[tuple[float, str], tuple[float, str]]] = {}  # (decode, first token)
    agree: dict[int, bool] = {}
    for batch in args.batches:
        question = torch.randint(3, 49000, (batch, args.question), generator=generator)
        ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 49), IMAGE_TOKEN), question], 1)
        pixels = torch.randn(batch, 3, 224, 224, generator=generator)
        for name in dict.fromkeys(args.dtypes + args.compiled):
            sides = []
            if name != "int8" and name in args.dtypes:
                reference.to(torch.float32 if name == "fp32" else torch.bfloat16)
                if name == "fp32":
                    reference.load_state_dict(pristine)
                sides.append(("transformers", name, theirs))
            if name in args.dtypes:
                sides.append(("rosetta", name, lambda inputs, n, m=models[name]: mine(inputs, n, m)))
            if name in args.compiled:
                sides.append(("rosetta", name + "+compile", lambda inputs, n, m=models[name]: mine(inputs, n, m, True)))
            tokens = {}
            for side, path, generate in sides:
                with torch.inference_mode():
                    warm_up, first, rate, tokens[side, path] = measure(generate, (ids, pixels), args.new, rows=batch)
                print(f"{side + ' ' + path:26} {batch:>5} {warm_up:>10.1f} {first:>14.3f} {rate:>13.1f}", flush=True)
                fastest, quickest = best.get((side, batch), ((0.0, ""), (float("inf"), "")))
                best[side, batch] = (max(fastest, (rate, path)), min(quickest, (first, path)))
            if ("transformers", "fp32") in tokens:
                agree[batch] = all(t == tokens["transformers", "fp32"] for t in tokens.values())
        reference.float()
    print()
    for batch in args.batches:
        ((mine_rate, mine_decode), (mine_first, mine_prefill)) = best["rosetta", batch]
        ((their_rate, their_decode), (their_first, their_prefill)) = best["transformers", batch]
        print(f"batch {batch} (each side's fastest): decode Rosetta {mine_decode} {mine_rate:.1f} tok/s vs "
              f"transformers {their_decode} {their_rate:.1f} tok/s: x{mine_rate / their_rate:.2f}; first token "
              f"Rosetta {mine_prefill} {mine_first:.3f} s vs transformers {their_prefill} {their_first:.3f} s: "
              f"x{their_first / mine_first:.2f}"
              + (f"; fp32 greedy tokens identical: {agree[batch]}" if batch in agree else ""))


if __name__ == "__main__":
    main()
