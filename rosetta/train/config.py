"""Training recipes: a YAML file read into a dataclass, with `--key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rosetta.errors import RosettaError


@dataclass
class DataConfig:
    train: str | list[str] = ""  # a manifest, a folder of captioned images, a folder of shards, or a list of them
    val: str | list[str] | None = None  # evaluated during training (zero-shot needs "label" columns and classes)
    classes: str | None = None  # JSON list of class names for zero-shot evaluation
    workers: int = 2


@dataclass
class VLMTrainConfig:
    """What a vision-language run (task: vlm) builds and trains."""

    # Compose a new model: the image tower of a contrastive model (anything rosetta.load opens) and a language
    # model (an LM preset built untrained, or a checkpoint), joined by a new projector. Unset: `model` is a
    # vision-language model (a preset, or a checkpoint such as a stage-1 run's).
    vision_tower: str | None = None
    language_model: str | None = None
    feature_layer: int = -2  # the tower's hidden states the projector reads (LLaVA: the second last)
    image_size: int | None = None  # run the tower at this resolution (its position table resized); None: its own
    # What trains: any of vision, projector, lm (stage 1, LLaVA's alignment: the projector alone).
    train: list[str] = field(default_factory=lambda: ["projector"])
    # Learning rates of parts, as multiples of the recipe's lr, e.g. {vision: 0.1}: a tower tuned gently.
    lr_scale: dict[str, float] = field(default_factory=dict)
    # LoRA on the language model instead of training it whole: {rank, alpha, dropout, targets}; merged on save.
    lora: dict[str, Any] | None = None
    # Pack several conversations into rows of this many tokens (each attends to itself only); 0: one a row.
    pack_length: int = 0
    # Cut conversations longer than this many tokens (0: the language model's context length), as LLaVA's
    # model_max_length does: never inside an image's (a tile's) tokens, dropped whole where they do not fit.
    max_length: int = 0


@dataclass
class TrainConfig:
    task: str = "clip"  # "clip": contrastive (CLIP, SigLIP, binding); "vlm": a vision-language model
    model: str = "tiny"  # a preset (trained from scratch) or anything rosetta.load opens (fine-tuned)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {vision: {image_size: 64}}
    tokenizer_vocab: int | None = None  # train a BPE of this size on the training captions (from scratch only)
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "runs/default"
    loss: str | None = None  # "softmax" (CLIP) or "sigmoid" (SigLIP); default: the model's own
    batch_size: int = 64  # global: across processes and accumulation steps, one optimiser step
    accum_steps: int = 1
    epochs: float = 1.0
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    # "fp32"; "bf16" (= "bf16-mixed": autocast over fp32 weights); "bf16-true" (bf16 weights and activations, fp32
    # master weights in the optimiser: the fast path on CPUs with AMX); "fp16" (autocast + grad scaler) on CUDA
    precision: str = "fp32"
    grad_checkpointing: bool = False
    lock_image: bool = False  # LiT: train only the text tower against a frozen image tower
    lock_text: bool = False
    # Binding (ImageBind's recipe): each pairing trains one modality's tower against a frozen anchor, e.g.
    # [{modality: audio, anchor: text}, {modality: video, anchor: text, weight: 0.5}]; every other tower is
    # frozen. Empty: image-text training. New towers come from model_overrides (audio: {...}, video: {...}).
    pairings: list[dict[str, Any]] = field(default_factory=list)
    distributed: str = "ddp"  # "ddp" or "fsdp" when launched with torchrun
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps; 0: at the end of each epoch
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    peak_tflops: float | None = None  # the device's peak, for MFU; measured or looked up when unset
    vlm: VLMTrainConfig = field(default_factory=VLMTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def pairing_list(self) -> list[Pairing]:
        """The pairings trained: the recipe's, or image-text."""
        return [Pairing(**p) for p in self.pairings] or [Pairing("image", "text")]


@dataclass(frozen=True)
class Pairing:
    """One contrastive objective: `modality`'s tower against `anchor`'s, weighted in the summed loss."""

    modality: str
    anchor: str = "text"
    weight: float = 1.0

    def __post_init__(self):
        towers = ("image", "text", "audio", "video")
        if self.modality not in towers or self.anchor not in ("image", "text") or self.modality == self.anchor:
            raise RosettaError(f"pairing {self.modality}-{self.anchor}: a modality of {', '.join(towers)} against "
                               "a different anchor, image or text")
        if not self.weight > 0:
            raise RosettaError(f"pairing {self.modality}-{self.anchor}: weight {self.weight} must be positive")

    @property
    def name(self) -> str:
        return f"{self.modality}-{self.anchor}"


_GROUPS = {"data": DataConfig, "vlm": VLMTrainConfig}
# YAML 1.1 reads 1e-3 (no dot) as a string; recipes and overrides mean a number.
_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) else value


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise RosettaError(f"{where}{key}: unknown setting (known: {', '.join(known)})")
        if key in _GROUPS:
            value = _build(_GROUPS[key], value or {}, f"{where}{key}.")
        elif key == "betas":
            value = tuple(map(_number, value))
        kwargs[key] = _number(value)
    return cls(**kwargs)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise RosettaError(f"--{dotted}: {part} is not a group of settings")
    tree[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe and apply `key=value` overrides (dotted keys reach into groups: data.train=...)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise RosettaError(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RosettaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for override in overrides:
        key, sep, raw = override.removeprefix("--").partition("=")
        if not sep:
            raise RosettaError(f"{override}: overrides are written key=value, e.g. --lr=1e-4")
        _set(values, key, yaml.safe_load(raw))
    config = _build(TrainConfig, values, "")
    if config.batch_size % config.accum_steps:
        raise RosettaError(f"batch_size {config.batch_size} is not divisible by accum_steps {config.accum_steps}")
    if config.task not in ("clip", "vlm"):
        raise RosettaError(f"task {config.task!r}: expected clip or vlm")
    unknown = (set(config.vlm.train) | set(config.vlm.lr_scale)) - {"vision", "projector", "lm"}
    if unknown:
        raise RosettaError(f"vlm.train, vlm.lr_scale: unknown parts {', '.join(sorted(unknown))} (vision, projector, "
                           "lm)")
    if config.precision not in ("fp32", "bf16", "bf16-mixed", "bf16-true", "fp16"):
        raise RosettaError(f"precision {config.precision!r}: expected fp32, bf16 (bf16-mixed), bf16-true or fp16")
    try:
        pairings = config.pairing_list()
    except TypeError as e:
        raise RosettaError(f"pairings: each is {{modality, anchor, weight}} ({e})") from None
    if len({p.name for p in pairings}) < len(pairings):
        raise RosettaError("pairings: the same pairing twice")
    return config
