"""The main job: the whole lifecycle, data to evaluated model, in a few minutes on a laptop CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rosetta.train.config import load_config

# The recipe, also written out as configs/shapes.yaml for `rosetta train`.
RECIPE = Path(__file__).with_name("shapes.yaml")
DEFAULT_IMAGES = 12_000


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
