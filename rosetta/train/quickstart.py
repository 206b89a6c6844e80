"""The main job: the whole lifecycle, data to evaluated model, in a few minutes on a laptop CPU.

`quickstart` trains a small CLIP on the built-in shapes; `bind_quickstart` then binds audio and video towers to
its space (ImageBind's recipe) and measures what binding gives for free: spoken captions find images they were
never paired with; `vlm_quickstart` makes a vision-language model of its image tower and a small language
model, which answers questions about the shapes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rosetta.train.config import load_config

# The recipe, also written out as configs/shapes.yaml for `rosetta train`.
RECIPE = Path(__file__).with_name("shapes.yaml")
BIND_RECIPE = Path(__file__).with_name("bind.yaml")  # also configs/bind.yaml
VLM_RECIPE = Path(__file__).with_name("vlm-shapes.yaml")  # also configs/vlm-shapes.yaml
DEFAULT_IMAGES = 12_000
DEFAULT_SPOKEN, DEFAULT_VIDEOS = 2_400, 960


def quickstart(out: str | Path = "runs/quickstart", n: int | None = None, epochs: float | None = None,
               resume: bool = False) -> dict:
    from rosetta.data.builtin import make_shapes
    from rosetta.eval import evaluate
    from rosetta.eval.plot import plot_run
    from rosetta.eval.report import format_table, write_results
    from rosetta.models.registry import load
    from rosetta.train.trainer import train

    out = Path(out)
    data = out / "data"
    began = time.perf_counter()
    if not (data / "test.jsonl").exists():
        print(f"[1/4] generating the built-in shapes dataset in {data}", flush=True)
        make_shapes(data, n=n or DEFAULT_IMAGES, seed=0)
    else:
        print(f"[1/4] using the shapes dataset in {data}", flush=True)

    overrides = [f"out={out / 'run'}", f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}",
                 f"data.classes={data / 'classes.json'}"]
    if epochs is not None:
        overrides.append(f"epochs={epochs}")
    print("[2/4] training a small CLIP on this machine", flush=True)
    model_dir = train(load_config(RECIPE, overrides), resume=resume)

    print("[3/4] evaluating on the test split", flush=True)
    from rosetta.data.records import read_records

    model = load(model_dir)
    classes = json.loads((data / "classes.json").read_text())
    results = evaluate(model, list(read_records(data / "test.jsonl")), classes=classes)
    write_results(out / "results.json", results, {"dataset": "shapes", "model": str(model_dir)})
    print(format_table(results))

    print("[4/4] plotting training curves", flush=True)
    plots = plot_run(out / "run")
    minutes = (time.perf_counter() - began) / 60
    print(f"\ndone in {minutes:.1f} min. model: {model_dir}  results: {out / 'results.json'}  plots: "
          f"{plots[0].parent if plots else 'none'}")
    example = next(iter(sorted((data / "images" / "test").glob("*.png"))), None)
    if example is not None:
        print(f"try it: rosetta classify --model {model_dir} --labels \"{','.join(classes[:4])}\" {example}")
    return results


def bind_quickstart(out: str | Path = "runs/quickstart", spoken: int | None = None, videos: int | None = None,
                    epochs: float | None = None, resume: bool = False) -> dict:
    """Bind audio and video towers to the quickstart's image-text model (trained first if it is not in `out`),
    then evaluate on the test split: spoken caption -> text and video -> text retrieval (trained), and spoken
    caption -> image (emergent: no sound was ever paired with an image)."""
    from rosetta.data.records import read_records
    from rosetta.data.shapes_media import make_shape_videos, make_spoken_captions
    from rosetta.eval.binding import binding
    from rosetta.eval.report import write_results
    from rosetta.models.registry import load
    from rosetta.train.trainer import train

    out = Path(out)
    began = time.perf_counter()
    data, base = _image_text_model(out, steps=4)
    if not (data / "spoken-test.jsonl").exists():
        print(f"[1/4] speaking the shapes' captions with espeak-ng into {data}", flush=True)
        make_spoken_captions(data, spoken or DEFAULT_SPOKEN, seed=0)
    if not (data / "videos-test.jsonl").exists():
        print(f"[1/4] rendering videos of moving shapes into {data}", flush=True)
        make_shape_videos(data, videos or DEFAULT_VIDEOS, seed=0)

    overrides = [f"model={base}", f"out={out / 'bind'}",
                 f"data.train=[{data / 'spoken-train.jsonl'}, {data / 'videos-train.jsonl'}]",
                 f"data.val=[{data / 'spoken-val.jsonl'}, {data / 'videos-val.jsonl'}, {data / 'val.jsonl'}]"]
    if epochs is not None:
        overrides.append(f"epochs={epochs}")
    config = load_config(BIND_RECIPE, overrides)
    print("[2/4] binding an audio tower and a video tower to the image-text space (its towers frozen)", flush=True)
    trained_at = time.perf_counter()
    model_dir = train(config, resume=resume)
    training_minutes = (time.perf_counter() - trained_at) / 60

    print("[3/4] evaluating on the test split", flush=True)
    records = [r for name in ("spoken-test.jsonl", "videos-test.jsonl", "test.jsonl")
               for r in read_records(data / name)]
    results = binding(load(model_dir), records, config.pairing_list())
    write_results(out / "bind-results.json", {"binding": results}, {"dataset": "shapes", "model": str(model_dir)})
    width = max(map(len, results))
    for name, value in results.items():
        print(f"  {name:{width}s}  {value:.4f}" if not name.endswith("_n") else f"  {name:{width}s}  {value:.0f}")
    print(f"\n[4/4] emergent spoken caption -> image top-1 (never paired in training): "
          f"{results.get('audio_to_image_top1', float('nan')):.1%}; video -> text R@1: "
          f"{results.get('video_to_text_recall@1', float('nan')):.1%}")
    print(f"done in {(time.perf_counter() - began) / 60:.1f} min (binding {training_minutes:.1f} min). model: "
          f"{model_dir}  results: {out / 'bind-results.json'}")
    example = next(iter(sorted((data / "audio" / "test").glob("*.wav"))), None)
    if example is not None:
        print(f"try it: rosetta classify --model {model_dir} --labels \"red circle,blue square\" {example}")
    return results


def vlm_quickstart(out: str | Path = "runs/quickstart", epochs: float | None = None, resume: bool = False) -> dict:
    """A vision-language model from the quickstart's image tower (the quickstart is run first if `out` has no
    model) and a small language model trained from scratch, on conversations about the shapes; then scored on
    the test split: attribute questions (VQA accuracy) and POPE's yes/no object probes."""
    from rosetta.data.records import read_records
    from rosetta.data.shapes_qa import make_shape_questions
    from rosetta.eval.generative import pope, vqa
    from rosetta.eval.report import format_table, write_results
    from rosetta.models.registry import load
    from rosetta.train.trainer import train

    out = Path(out)
    began = time.perf_counter()
    data, base = _image_text_model(out, steps=3)
    if not (data / "test-conversations.jsonl").exists():
        print(f"[1/3] writing questions about the shapes into {data}", flush=True)
        make_shape_questions(data, seed=0)
    overrides = [f"vlm.vision_tower={base}", f"out={out / 'vlm'}",
                 f"data.train={data / 'train-conversations.jsonl'}",
                 f"data.val={data / 'val-pope.jsonl'}"]  # POPE: quick to score, and it tracks hallucination
    if epochs is not None:
        overrides.append(f"epochs={epochs}")
    print("[2/3] training a vision-language model: the quickstart's image tower (frozen), a new projector and a "
          "small language model", flush=True)
    trained_at = time.perf_counter()
    model_dir = train(load_config(VLM_RECIPE, overrides), resume=resume)
    training_minutes = (time.perf_counter() - trained_at) / 60

    print("[3/3] evaluating on the test split", flush=True)
    model = load(model_dir)
    results = {"vqa": vqa(model, list(read_records(data / "test-vqa.jsonl")), batch_size=64),
               "pope": pope(model, list(read_records(data / "test-pope.jsonl")), batch_size=64)}
    write_results(out / "vlm-results.json", results, {"dataset": "shapes", "model": str(model_dir)})
    print(format_table(results))
    print(f"\nattribute questions: {results['vqa']['accuracy']:.1%} right; POPE F1 {results['pope']['f1']:.3f}, "
          f"yes-ratio {results['pope']['yes_ratio']:.2f}")
    print(f"done in {(time.perf_counter() - began) / 60:.1f} min (training {training_minutes:.1f} min). model: "
          f"{model_dir}  results: {out / 'vlm-results.json'}")
    example = next(iter(sorted((data / "images" / "test").glob("*.png"))), None)
    if example is not None:
        print(f'try it: rosetta ask --model {model_dir} {example} "What colour is the shape?"')
    return results


def _image_text_model(out: Path, steps: int) -> tuple[Path, Path]:
    """The quickstart's data folder and image-text model in `out`, the quickstart run first if it is not there."""
    data, base = out / "data", out / "run" / "model"
    if not (base / "config.json").exists():
        print(f"[0/{steps}] no image-text model in {out / 'run'} yet: running the quickstart first", flush=True)
        quickstart(out)
    return data, base
