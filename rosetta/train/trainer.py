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
from rosetta.models.config import PRESETS, ContrastiveConfig, TextConfig
from rosetta.models.contrastive import ContrastiveModel
from rosetta.train import checkpoint, distributed
from rosetta.train.config import TrainConfig
from rosetta.train.flops import describe_peak, peak_flops, train_flops
from rosetta.train.losses import contrastive_loss
from rosetta.train.metrics import MetricsLog

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EpochSampler(Sampler[int]):
    """This rank's share of one epoch: a seeded permutation cut into global batches, from a batch position on."""

    def __init__(self, n: int, global_batch: int, world: distributed.World, seed: int, epoch: int, start: int = 0):
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        self.global_batch, self.world, self.start = global_batch, world, start
        self.batches = n // global_batch

    def __iter__(self) -> Iterator[int]:
        share = self.global_batch // self.world.size
        for b in range(self.start, self.batches):
            first = b * self.global_batch + self.world.rank * share
            yield from self.order[first : first + share].tolist()

    def __len__(self) -> int:
        return (self.batches - self.start) * (self.global_batch // self.world.size)


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
        if cfg.model_overrides or cfg.tokenizer_vocab:
            raise RosettaError("model_overrides and tokenizer_vocab apply to presets trained from scratch only")
        model = load(cfg.model, device="cpu")
        if cfg.loss and cfg.loss != model.config.loss:
            raise RosettaError(f"{cfg.model} was trained with the {model.config.loss} loss; fine-tune it with the same")
        return model
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
        from rosetta.data.records import read_records
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
        # Shard members are listed, not read: the images are read by the DataLoader workers, sample by sample.
        self.train_records = [r for r in read_records(cfg.data.train, lazy=True)
                              if r.get("text") and r.get("image") is not None]
        if len(self.train_records) < cfg.batch_size:
            raise RosettaError(
                f"{cfg.data.train}: {len(self.train_records)} captioned images, fewer than a batch ({cfg.batch_size})"
            )
        self.val_records = list(read_records(cfg.data.val)) if cfg.data.val else []
        self.classes = json.loads(Path(cfg.data.classes).read_text()) if cfg.data.classes else None

        self.model = build_model(cfg, [r["text"] for r in self.train_records]).to(self.device)
        self.loss_kind = self.model.config.loss
        for tower, locked in ((self.model.vision, cfg.lock_image), (self.model.text, cfg.lock_text)):
            tower.transformer.gradient_checkpointing = cfg.grad_checkpointing
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

        self.steps_per_epoch = len(self.train_records) // cfg.batch_size
        self.total_steps = max(1, int(cfg.epochs * self.steps_per_epoch))
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, self.total_steps, cfg.min_lr / cfg.lr if cfg.lr else 0.0)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self._compute_dtype = _AUTOCAST.get(cfg.precision, torch.float32)
        self.flops_per_sample = train_flops(self.model.config, cfg.lock_image, cfg.lock_text)
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
            for tower in (model.vision, model.text):
                for block in tower.transformer.blocks:
                    fully_shard(block)
            return fully_shard(model)
        if self.cfg.distributed != "ddp":
            raise RosettaError(f"distributed {self.cfg.distributed!r}: expected ddp or fsdp")
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _loader(self, epoch: int, start: int) -> DataLoader:
        from rosetta.data.dataset import PairDataset

        dataset = PairDataset.from_model(self.train_records, self.model)
        sampler = EpochSampler(len(dataset), self.cfg.batch_size, self.world, self.cfg.seed, epoch, start)
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size // (self.world.size * self.cfg.accum_steps), sampler=sampler,
            num_workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.cfg.data.workers else None,
        )

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

    def _loss(self, images: list[torch.Tensor], texts: list[torch.Tensor], scale, bias) -> torch.Tensor:
        return contrastive_loss(self.loss_kind, torch.cat(images), torch.cat(texts), scale, bias, self.world)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        batches = [(p.to(self.device, non_blocking=True), i.to(self.device, non_blocking=True))
                   for p, i in micro_batches]
        if len(batches) == 1:
            with self._autocast():
                image, text, scale, bias = self.wrapped(*batches[0])
                loss = self._loss([image], [text], scale, bias)
            self.scaler.scale(loss).backward()
        else:
            # Features of every micro-batch without gradients, then each micro-batch again with them, its own
            # features swapped in: summed, the gradients are those of the loss over the whole batch.
            with torch.no_grad(), self._autocast():
                cached = [self.wrapped(*b)[:2] for b in batches]
            images, texts = [c[0] for c in cached], [c[1] for c in cached]
            for j, batch in enumerate(batches):
                sync = j == len(batches) - 1 or not hasattr(self.wrapped, "no_sync")
                with contextlib.nullcontext() if sync else self.wrapped.no_sync(), self._autocast():
                    image, text, scale, bias = self.wrapped(*batch)
                    loss = self._loss([*images[:j], image, *images[j + 1:]], [*texts[:j], text, *texts[j + 1:]],
                                      scale, bias)
                self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
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
        results = evaluate(self.model, self.val_records, classes=self.classes)
        if self.sharded:
            self.model.reshard()
        self.model.train()
        return {f"{task}/{k}" if task != "zeroshot" else k: v for task, metrics in results.items()
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
                loader = iter(self._loader(epoch, position))
                while position < self.steps_per_epoch and self.step < self.total_steps:
                    start = time.perf_counter()
                    micro = [self._next(loader) for _ in range(cfg.accum_steps)]
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
                            "temperature": self._temperature(),
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

    def _temperature(self) -> float:
        scale = self.model.logit_scale
        scale = scale.full_tensor() if hasattr(scale, "full_tensor") else scale  # FSDP shards it
        return 1 / scale.exp().item()

    @staticmethod
    def _next(loader: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(loader)
        except InputError as e:
            reason = str(e).strip().splitlines()[-1].split("InputError: ")[-1]
            raise RosettaError(
                f"unreadable training sample: {reason} (remove it, e.g. with 'rosetta data clean', then --resume)"
            ) from None


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown()
