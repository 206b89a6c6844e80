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
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from rosetta.errors import InputError, RosettaError
from rosetta.models.config import AUDIO_PRESETS, PRESETS, AudioConfig, ContrastiveConfig, TextConfig, VideoConfig
from rosetta.models.contrastive import ContrastiveModel
from rosetta.train import checkpoint, distributed
from rosetta.train.config import TrainConfig
from rosetta.train.flops import describe_peak, pairing_flops, peak_flops
from rosetta.train.losses import contrastive_loss
from rosetta.train.metrics import MetricsLog

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepSampler(Sampler[int]):
    """This rank's share of the global batches of training steps [start, end) for one stream of records.

    Each pass over the records is a seeded permutation cut into global batches; step g takes batch
    g mod batches of pass g // batches. Stream 0 (the first pairing) passes once per epoch; a pairing with
    fewer records cycles through its own passes meanwhile. Anything resumes at any step.
    """

    def __init__(self, n: int, global_batch: int, world: distributed.World, seed: int, start: int, end: int,
                 stream: int = 0):
        self.n, self.global_batch, self.world = n, global_batch, world
        self.seed, self.start, self.end, self.stream = seed, start, end, stream
        self.batches = n // global_batch

    def _order(self, cycle: int) -> torch.Tensor:
        seed = self.seed * 100_003 + cycle + self.stream * 1_000_003
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[int]:
        share = self.global_batch // self.world.size
        cycle, order = -1, None
        for step in range(self.start, self.end):
            if step // self.batches != cycle:
                cycle = step // self.batches
                order = self._order(cycle)
            first = step % self.batches * self.global_batch + self.world.rank * share
            yield from order[first : first + share].tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * (self.global_batch // self.world.size)


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases, the temperature and bias, or other vectors (as CLIP and open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from rosetta.data.records import holds
        from rosetta.models.io import resolve_device

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.world = distributed.init(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.batch_size % (self.world.size * cfg.accum_steps):
            raise RosettaError(
                f"batch_size {cfg.batch_size} must divide evenly over {self.world.size} processes "
                f"x {cfg.accum_steps} accumulation steps"
            )
        self.run_dir = Path(cfg.out)
        self._seed(cfg.seed)

        if not cfg.data.train:
            raise RosettaError("no training data: set data.train (a manifest, a captioned-image folder or shards)")
        self.pairings = cfg.pairing_list()
        self.binding = bool(cfg.pairings)
        # Shard members are listed, not read: the files are read by the DataLoader workers, sample by sample.
        records = list(_read_all(cfg.data.train, lazy=True))
        self.train_records = [[r for r in records if holds(r, p.modality) and holds(r, p.anchor)]
                              for p in self.pairings]
        for pairing, pool in zip(self.pairings, self.train_records):
            if len(pool) < cfg.batch_size:
                what = f"records with {pairing.modality} and {pairing.anchor}" if self.binding else "captioned images"
                raise RosettaError(f"{cfg.data.train}: {len(pool)} {what}, fewer than a batch ({cfg.batch_size})")
        self.val_records = list(_read_all(cfg.data.val)) if cfg.data.val else []
        self.classes = json.loads(Path(cfg.data.classes).read_text()) if cfg.data.classes else None

        texts = [r["text"] for pool in self.train_records for r in pool if r.get("text")]
        self.model = build_model(cfg, texts).to(self.device)
        self.loss_kind = self.model.config.loss
        for tower in (self.model.vision, self.model.text, self.model.audio, self.model.video):
            if tower is not None:
                tower.transformer.gradient_checkpointing = cfg.grad_checkpointing
        if self.binding:  # ImageBind: the anchors, and every tower not paired, stay as they are
            self.model.requires_grad_(False)
            for pairing in self.pairings:
                for part in tower_modules(self.model, pairing.modality):
                    part.requires_grad_(True)
        for tower, locked in ((self.model.vision, cfg.lock_image), (self.model.text, cfg.lock_text)):
            if locked:
                tower.requires_grad_(False)
        if cfg.lock_image:
            self.model.vision_proj.requires_grad_(False)
        # Weights are restored before sharding: FSDP shards whatever the model holds when it is wrapped.
        self.resume_from = checkpoint.latest(self.run_dir) if resume else None
        if self.resume_from is not None:
            from rosetta.models.io import read_weights

            self.model.load_state_dict(read_weights(self.resume_from, ("model.safetensors",)))
        self.wrapped = self._wrap(self.model)

        self.steps_per_epoch = len(self.train_records[0]) // cfg.batch_size
        self.total_steps = max(1, int(cfg.epochs * self.steps_per_epoch))
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, self.total_steps, cfg.min_lr / cfg.lr if cfg.lr else 0.0)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.pairing_losses: dict[str, torch.Tensor] = {}  # this rank's last loss of each pairing, for the log
        self._compute_dtype = _AUTOCAST.get(cfg.precision, torch.float32)
        if self.binding:
            trained = {p.modality for p in self.pairings}
        else:
            trained = {m for m, locked in (("image", cfg.lock_image), ("text", cfg.lock_text)) if not locked}
        self.flops_per_sample = pairing_flops(self.model.config, [(p.modality, p.anchor) for p in self.pairings],
                                              trained)
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device, self._compute_dtype)

    # Set-up.

    def _seed(self, seed: int) -> None:
        seed += self.world.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _wrap(self, model: ContrastiveModel) -> torch.nn.Module:
        if self.world.size == 1:
            return model
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for tensor in model.state_dict().values():  # every rank shards rank 0's weights, as DDP would use
                torch.distributed.broadcast(tensor, src=0)
            for tower in (model.vision, model.text, model.audio, model.video):
                for block in tower.transformer.blocks if tower is not None else ():
                    fully_shard(block)
            return fully_shard(model)
        if self.cfg.distributed != "ddp":
            raise RosettaError(f"distributed {self.cfg.distributed!r}: expected ddp or fsdp")
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _loaders(self, epoch: int, position: int) -> list[DataLoader]:
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

    # Checkpoints.

    @property
    def sharded(self) -> bool:
        return self.cfg.distributed == "fsdp" and self.world.size > 1

    def _optimizer_state(self) -> dict[str, Any]:
        """The whole optimiser state (FSDP gathers each rank's shard: every rank must call this)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def _full_state_model(self) -> ContrastiveModel | None:
        """The model with full (unsharded) weights on the main rank, for saving (every rank must call this)."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:  # the gathered weights land on rank 0 only
            return None
        with torch.device("meta"):
            copy = ContrastiveModel(self.model.config, tokenizer=self.model.tokenizer)
        copy.load_state_dict(state, assign=True)
        return copy

    def save_checkpoint(self, epoch: int, position: int) -> None:
        model, optimizer = self._full_state_model(), self._optimizer_state()
        if self.world.is_main:
            state = {
                "step": self.step, "epoch": epoch, "position": position, "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": checkpoint.rng_state(), "config": self.cfg.to_dict(),
            }
            checkpoint.save(self.run_dir, self.step, model, state, self.cfg.keep_checkpoints)
        if self.world.size > 1:
            torch.distributed.barrier()

    def _restore(self) -> tuple[int, int]:
        """Restore the training state of the checkpoint the weights came from; returns (epoch, batch position)."""
        path = self.resume_from
        if path is None:
            return 0, 0
        state = checkpoint.load_state(path)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # FSDP sets itself up on the root's first forward, which must come before loading sharded state.
            size, length = self.model.config.vision.image_size, self.model.config.text.context_length
            with torch.no_grad():
                self.wrapped(torch.zeros(1, 3, size, size, device=self.device),
                             torch.zeros(1, length, dtype=torch.long, device=self.device))
            self.model.reshard()  # the root keeps its weights gathered after forward; the optimiser holds shards
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        if self.world.is_main:
            print(f"resumed from {path} (step {self.step})", flush=True)
        return state["epoch"], state["position"]

    # The step.

    def _autocast(self):
        dtype = _AUTOCAST.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

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
            with self._autocast():
                features = self._features(batches[0])
                loss = self._loss([features], [f[2:] for f in features])
            self.scaler.scale(loss).backward()
        else:
            # Features of every micro-batch without gradients, then each micro-batch again with them, its own
            # features swapped in: summed, the gradients are those of the loss over the whole batch.
            with torch.no_grad(), self._autocast():
                cached = [self._features(b) for b in batches]
            for j, batch in enumerate(batches):
                sync = j == len(batches) - 1 or not hasattr(self.wrapped, "no_sync")
                with contextlib.nullcontext() if sync else self.wrapped.no_sync(), self._autocast():
                    features = self._features(batch)
                    loss = self._loss([*cached[:j], features, *cached[j + 1:]], [f[2:] for f in features])
                self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            for scale in (self.model.logit_scale, *self.model.bound_logit_scale.values()):
                scale.clamp_(0, math.log(100))
        self.step += 1
        return distributed.mean_across(loss.item(), self.world)

    # The loop.

    def evaluate(self) -> dict[str, float]:
        """Validation metrics; every rank runs it, so sharded (FSDP) weights gather in step."""
        from rosetta.eval import evaluate

        if not self.val_records:
            return {}
        self.model.eval()
        if self.sharded:  # the root's own weights are only gathered by its forward: gather them for the tasks
            self.model.unshard()
        if self.binding:
            from rosetta.eval.binding import binding

            results = {"binding": binding(self.model, self.val_records, self.pairings)}
        else:
            results = evaluate(self.model, self.val_records, classes=self.classes)
        if self.sharded:
            self.model.reshard()
        self.model.train()
        return {f"{task}/{k}" if task not in ("zeroshot", "binding") else k: v for task, metrics in results.items()
                for k, v in metrics.items() if k != "n"}

    def fit(self) -> Path:
        """Train to the end of the recipe; returns the final model directory (RUN_DIR/model)."""
        cfg = self.cfg
        resume = self.resume_from is not None
        epoch, position = self._restore()
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(json.dumps(cfg.to_dict(), indent=2))
        log = MetricsLog(self.run_dir, enabled=self.world.is_main, resume_step=self.step if resume else None)
        if self.world.is_main:
            source = "--peak-tflops" if cfg.peak_tflops else describe_peak(self.device, self._compute_dtype)
            print(f"mfu: of a {self.peak / 1e9:.0f} GFLOP/s peak per process ({source})", flush=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.world.is_main, dynamic_ncols=True, mininterval=2.0)
        self.model.train()
        try:
            while self.step < self.total_steps:
                loaders = [iter(loader) for loader in self._loaders(epoch, position)]
                while position < self.steps_per_epoch and self.step < self.total_steps:
                    start = time.perf_counter()
                    micro = [[self._next(loader) for loader in loaders] for _ in range(cfg.accum_steps)]
                    loss = self.train_step(micro)
                    position += 1
                    seconds = time.perf_counter() - start
                    speed = cfg.batch_size / seconds
                    mfu = self.flops_per_sample * speed / (self.peak * self.world.size)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{speed:.1f}", mfu=f"{mfu:.1%}")
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        log.log(self.step, "train", {
                            "epoch": epoch + position / self.steps_per_epoch, "loss": loss,
                            "lr": self.scheduler.get_last_lr()[0], "samples_per_s": speed, "mfu": mfu,
                            **self._temperatures(),
                            **({k: v.item() for k, v in self.pairing_losses.items()} if self.binding else {}),
                        })
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        log.log(self.step, "val", self.evaluate())
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint(epoch, position)
                if position >= self.steps_per_epoch:
                    epoch, position = epoch + 1, 0
                    if not cfg.eval_every:
                        log.log(self.step, "val", {"epoch": epoch, **self.evaluate()})
            self.save_checkpoint(epoch, position)
            final = self.run_dir / "model"
            model = self._full_state_model()
            if self.world.is_main:
                model.save_pretrained(final)
            return final
        finally:
            bar.close()
            log.close()

    def _temperatures(self) -> dict[str, float]:
        """The image-text temperature, or each bound modality's when binding."""
        def temperature(scale: torch.Tensor) -> float:
            scale = scale.full_tensor() if hasattr(scale, "full_tensor") else scale  # FSDP shards it
            return 1 / scale.exp().item()

        if not self.binding:
            return {"temperature": temperature(self.model.logit_scale)}
        return {f"temperature/{p.modality}": temperature(self.model.temperature_of(p.modality)) for p in self.pairings}

    @staticmethod
    def _next(loader: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(loader)
        except InputError as e:
            reason = str(e).strip().splitlines()[-1].split("InputError: ")[-1]
            raise RosettaError(
                f"unreadable training sample: {reason} (remove it, e.g. with 'rosetta data clean', then --resume)"
            ) from None


def _read_all(sources: str | list[str], lazy: bool = False) -> Iterator[dict]:
    from rosetta.data.records import read_records

    for source in [sources] if isinstance(sources, str) else sources:
        yield from read_records(source, lazy=lazy)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown()
