"""Contrastive pre-training and fine-tuning, from one CPU to many GPUs under torchrun.

The batch size in a recipe is global: one optimiser step sees `batch_size` pairs, split across
ranks and then across accumulation steps. The contrastive loss always spans the whole global batch
(features are gathered across ranks, and cached across accumulation steps as open_clip's
--accum-freq does), so changing the number of processes or accumulation steps changes the speed,
not the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rosetta.errors import RosettaError
from rosetta.models.config import AUDIO_PRESETS, PRESETS, AudioConfig, ContrastiveConfig, TextConfig, VideoConfig
from rosetta.models.contrastive import ContrastiveModel
from rosetta.train import distributed
from rosetta.train.config import TrainConfig
from rosetta.train.flops import pairing_flops
from rosetta.train.loop import StepSampler, TrainLoop, read_all
from rosetta.train.losses import contrastive_loss


def _apply_overrides(config: ContrastiveConfig, overrides: dict[str, Any]) -> ContrastiveConfig:
    groups = {f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))}
    changes = {}
    for key, value in overrides.items():
        if key in groups:
            value = dataclasses.replace(getattr(config, key), **value)
        changes[key] = value
    return dataclasses.replace(config, **changes)


def build_model(cfg: TrainConfig, texts: list[str]) -> ContrastiveModel:
    """A preset trained from scratch, or any checkpoint rosetta.load opens, to fine-tune."""
    from rosetta.modalities.text import EOS, TextTokenizer, train_bpe
    from rosetta.models.registry import load

    if cfg.model not in PRESETS:
        if set(cfg.model_overrides) - set(BOUND_TOWERS) or cfg.tokenizer_vocab:
            raise RosettaError("a trained model takes new towers (model_overrides audio: and video:); other "
                               "model_overrides and tokenizer_vocab apply to presets trained from scratch only")
        model = load(cfg.model, device="cpu")
        if cfg.loss and cfg.loss != model.config.loss:
            raise RosettaError(f"{cfg.model} was trained with the {model.config.loss} loss; fine-tune it with the same")
        return with_towers(model, cfg.model_overrides) if cfg.model_overrides else model
    config = _apply_overrides(PRESETS[cfg.model], cfg.model_overrides)
    if cfg.loss == "sigmoid" and config.loss != "sigmoid":  # SigLIP's initial temperature and bias
        config = dataclasses.replace(config, loss="sigmoid", logit_scale_init=math.log(10), logit_bias_init=-10.0)
    elif cfg.loss == "softmax" and config.loss != "softmax":
        config = dataclasses.replace(config, loss="softmax", logit_scale_init=math.log(1 / 0.07), logit_bias_init=None)
    if not cfg.tokenizer_vocab:
        return ContrastiveModel(config)
    backend = train_bpe(texts, cfg.tokenizer_vocab)
    text: TextConfig = dataclasses.replace(
        config.text, vocab_size=backend.get_vocab_size(), eos_token_id=backend.token_to_id(EOS), pad_token_id=0,
    )
    config = dataclasses.replace(config, text=text)
    tokenizer = TextTokenizer(backend, text.context_length, text.pad_token_id, text.cleaning)
    return ContrastiveModel(config, tokenizer=tokenizer)


BOUND_TOWERS = {"audio": AudioConfig, "video": VideoConfig}
TOWER_PRESETS = {"audio": AUDIO_PRESETS, "video": {}}


def with_towers(model: ContrastiveModel, towers: dict[str, dict[str, Any] | str]) -> ContrastiveModel:
    """`model` with new audio and/or video towers (untrained), every other weight kept; a tower is its settings
    or a preset's name (`AUDIO_PRESETS`: ast-tiny, ast-small, ast-base, shapes-speech)."""
    config = dataclasses.replace(model.config, **{name: _tower(name, settings) for name, settings in towers.items()})
    bound = ContrastiveModel(config, tokenizer=model.tokenizer)
    new = tuple(towers) + tuple(f"{name}_proj" for name in towers) + tuple(f"bound_logit_scale.{n}" for n in towers)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(new)}
    missing, unexpected = bound.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(new) for k in missing), (missing, unexpected)
    return bound


def _tower(name: str, settings: dict[str, Any] | str | None) -> AudioConfig | VideoConfig:
    if not isinstance(settings, str):
        return BOUND_TOWERS[name](**(settings or {}))
    if settings not in TOWER_PRESETS[name]:
        known = ", ".join(TOWER_PRESETS[name]) or "none: give its settings"
        raise RosettaError(f"model_overrides {name}: unknown preset {settings!r} (presets: {known})")
    return TOWER_PRESETS[name][settings]


def tower_modules(model: ContrastiveModel, modality: str) -> list[torch.nn.Module | torch.nn.Parameter]:
    """What training `modality`'s tower trains: the encoder, its projection, a bound tower's temperature."""
    if modality == "image":
        return [model.vision, model.vision_proj]
    if modality == "text":
        return [model.text, model.text_proj]
    tower = getattr(model, modality)
    if tower is None:
        what = "a temporal transformer (video: {layers: 2})" if modality == "video" else "an audio tower (audio: {})"
        raise RosettaError(f"pairing {modality}: the model has no {modality} tower to train; add {what} "
                           "under model_overrides")
    projection = [model.audio_proj] if modality == "audio" else []
    return [tower, *projection, model.bound_logit_scale[modality]]


class Trainer(TrainLoop):
    """The contrastive trainer: image-text pairs (CLIP, SigLIP), or towers bound to an anchor (ImageBind)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from rosetta.data.records import holds

        super().__init__(cfg, resume)
        self.pairings = cfg.pairing_list()
        self.binding = bool(cfg.pairings)
        # Shard members are listed, not read: the files are read by the DataLoader workers, sample by sample.
        records = list(read_all(cfg.data.train, lazy=True))
        self.train_records = [[r for r in records if holds(r, p.modality) and holds(r, p.anchor)]
                              for p in self.pairings]
        for pairing, pool in zip(self.pairings, self.train_records):
            if len(pool) < cfg.batch_size:
                what = f"records with {pairing.modality} and {pairing.anchor}" if self.binding else "captioned images"
                raise RosettaError(f"{cfg.data.train}: {len(pool)} {what}, fewer than a batch ({cfg.batch_size})")
        self.val_records = list(read_all(cfg.data.val)) if cfg.data.val else []
        self.classes = json.loads(Path(cfg.data.classes).read_text()) if cfg.data.classes else None

        texts = [r["text"] for pool in self.train_records for r in pool if r.get("text")]
        model = build_model(cfg, texts)
        self.loss_kind = model.config.loss
        for tower in (model.vision, model.text, model.audio, model.video):
            if tower is not None:
                tower.transformer.gradient_checkpointing = cfg.grad_checkpointing
        if self.binding:  # ImageBind: the anchors, and every tower not paired, stay as they are
            model.requires_grad_(False)
            for pairing in self.pairings:
                for part in tower_modules(model, pairing.modality):
                    part.requires_grad_(True)
        for tower, locked in ((model.vision, cfg.lock_image), (model.text, cfg.lock_text)):
            if locked:
                tower.requires_grad_(False)
        if cfg.lock_image:
            model.vision_proj.requires_grad_(False)
        self.pairing_losses: dict[str, torch.Tensor] = {}  # this rank's last loss of each pairing, for the log
        if self.binding:
            trained = {p.modality for p in self.pairings}
        else:
            trained = {m for m, locked in (("image", cfg.lock_image), ("text", cfg.lock_text)) if not locked}
        flops = pairing_flops(model.config, [(p.modality, p.anchor) for p in self.pairings], trained)
        self.start(model, len(self.train_records[0]) // cfg.batch_size, flops)

    def shard_units(self) -> list[torch.nn.Module]:
        towers = (self.model.vision, self.model.text, self.model.audio, self.model.video)
        return [block for tower in towers if tower is not None for block in tower.transformer.blocks]

    def warm_up_sharded(self) -> None:
        size, length = self.model.config.vision.image_size, self.model.config.text.context_length
        with torch.no_grad():
            self.wrapped(torch.zeros(1, 3, size, size, device=self.device),
                         torch.zeros(1, length, dtype=torch.long, device=self.device))

    def loaders(self, epoch: int, position: int) -> list[DataLoader]:
        """One loader per pairing over the rest of this epoch's steps, each from its own stream of records."""
        from rosetta.data.dataset import PairDataset

        first, end = epoch * self.steps_per_epoch + position, (epoch + 1) * self.steps_per_epoch
        loaders = []
        for stream, (pairing, records) in enumerate(zip(self.pairings, self.train_records)):
            dataset = PairDataset.from_model(records, self.model, (pairing.modality, pairing.anchor))
            sampler = StepSampler(len(dataset), self.cfg.batch_size, self.world, self.cfg.seed, first, end, stream)
            loaders.append(DataLoader(
                dataset, batch_size=self.cfg.batch_size // (self.world.size * self.cfg.accum_steps), sampler=sampler,
                num_workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda",
                persistent_workers=False, prefetch_factor=4 if self.cfg.data.workers else None,
            ))
        return loaders

    # The step.

    def _features(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
        """(features, anchor features, log temperature, bias) of each pairing, from one forward of the model."""
        if not self.binding:
            return [self.wrapped(*batch[0])]
        pairs = [(p.modality, p.anchor, a, b) for p, (a, b) in zip(self.pairings, batch)]
        return [(a, b, scale, None) for a, b, scale in self.wrapped(pairs=pairs)]

    def _loss(self, micro: list[list[tuple[torch.Tensor, ...]]], scales: list[tuple[torch.Tensor, ...]]
              ) -> torch.Tensor:
        """The weighted sum over pairings of each one's contrastive loss over the whole batch (all micro-batches)."""
        total = 0.0
        for k, (pairing, (scale, bias)) in enumerate(zip(self.pairings, scales)):
            kind = self.loss_kind if not self.binding else "softmax"  # ImageBind's InfoNCE for bound towers
            features = torch.cat([m[k][0] for m in micro])
            anchors = torch.cat([m[k][1] for m in micro])
            loss = contrastive_loss(kind, features, anchors, scale, bias, self.world)
            self.pairing_losses[f"loss/{pairing.name}"] = loss.detach()  # read when logged: no sync per step
            total = total + pairing.weight * loss
        return total

    def train_step(self, micro_batches: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> float:
        """One optimiser step over micro-batches, each a (inputs, anchor inputs) batch per pairing."""
        batches = [[(a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)) for a, b in micro]
                   for micro in micro_batches]
        if len(batches) == 1:
            with self.autocast():
                features = self._features(batches[0])
                loss = self._loss([features], [f[2:] for f in features])
            self.scaler.scale(loss).backward()
        else:
            # Features of every micro-batch without gradients, then each micro-batch again with them, its own
            # features swapped in: summed, the gradients are those of the loss over the whole batch.
            with torch.no_grad(), self.autocast():
                cached = [self._features(b) for b in batches]
            for j, batch in enumerate(batches):
                sync = j == len(batches) - 1 or not hasattr(self.wrapped, "no_sync")
                with contextlib.nullcontext() if sync else self.wrapped.no_sync(), self.autocast():
                    features = self._features(batch)
                    loss = self._loss([*cached[:j], features, *cached[j + 1:]], [f[2:] for f in features])
                self.scaler.scale(loss).backward()
        self.optimizer_step()
        with torch.no_grad():
            for scale in (self.model.logit_scale, *self.model.bound_logit_scale.values()):
                self.master(scale).clamp_(0, math.log(100))
                scale.copy_(self.master(scale))
        return distributed.mean_across(loss.item(), self.world)

    # Evaluation and the log.

    def evaluate(self) -> dict[str, float]:
        """Validation metrics; every rank runs it, so sharded (FSDP) weights gather in step."""
        from rosetta.eval import evaluate

        if not self.val_records:
            return {}
        if self.binding:
            from rosetta.eval.binding import binding

            results = {"binding": binding(self.model, self.val_records, self.pairings)}
        else:
            results = evaluate(self.model, self.val_records, classes=self.classes)
        return {f"{task}/{k}" if task not in ("zeroshot", "binding") else k: v for task, metrics in results.items()
                for k, v in metrics.items() if k != "n"}

    def log_extras(self) -> dict[str, float]:
        """The image-text temperature, or each bound modality's and each pairing's loss when binding."""
        def temperature(scale: torch.Tensor) -> float:
            scale = scale.full_tensor() if hasattr(scale, "full_tensor") else scale  # FSDP shards it
            return 1 / scale.exp().item()

        if not self.binding:
            return {"temperature": temperature(self.model.logit_scale)}
        return {**{f"temperature/{p.modality}": temperature(self.model.temperature_of(p.modality))
                   for p in self.pairings},
                **{k: v.item() for k, v in self.pairing_losses.items()}}


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train what the recipe says (`task`: clip, the default, or vlm); returns the final model directory."""
    if cfg.task == "vlm":
        from rosetta.train.vlm import VLMTrainer

        trainer = VLMTrainer(cfg, resume=resume)
    else:
        trainer = Trainer(cfg, resume=resume)
    try:
        final = trainer.fit()
    except BaseException:
        distributed.shutdown()
        raise
    distributed.shutdown(together=True)  # rank 0 may still be writing the model the others are done with
    return final
