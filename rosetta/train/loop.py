"""What every trainer shares, whatever it trains: processes, the optimiser and its schedule, mixed precision,
checkpoints that resume exactly, and the loop with its progress bar, metrics log and evaluations.

A trainer (the contrastive one in trainer.py, the vision-language one in vlm.py) builds its model and data,
then hands them to `TrainLoop.start`; it says how a step is taken (`train_step`), where the batches come
from (`loaders`) and how the model is scored (`evaluate`).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from rosetta.errors import InputError, RosettaError
from rosetta.models.io import keep_freed_memory
from rosetta.train import checkpoint, distributed
from rosetta.train.config import TrainConfig
from rosetta.train.flops import describe_peak, peak_flops
from rosetta.train.metrics import MetricsLog

AUTOCAST = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16": torch.float16}
COMPUTE_DTYPES = {**AUTOCAST, "bf16-true": torch.bfloat16}


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


def read_all(sources: str | list[str], lazy: bool = False) -> Iterator[dict]:
    """The records of a source or of a list of sources, in order."""
    from rosetta.data.records import read_records

    for source in [sources] if isinstance(sources, str) else sources:
        yield from read_records(source, lazy=lazy)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases, the temperature and bias, or other vectors (as CLIP and open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MasterWeights:
    """bf16-true training: the model computes in bf16 (no casts, half the memory traffic of autocast) while fp32
    copies of its weights are what the optimiser updates and what checkpoints hold, so small updates are not lost
    to bf16's rounding and frozen weights are saved exactly as loaded. Gradients are bf16 until the update (summed
    in bf16 over accumulation steps and across DDP ranks). Floating buffers keep fp32 copies too: saved as loaded
    unless training changed them."""

    def __init__(self, model: nn.Module):
        self.params = [(p, p.detach().float().clone()) for p in model.parameters() if p.is_floating_point()]
        self.buffers = [(module, name, b.detach().float().clone()) for module in model.modules()
                        for name, b in module._buffers.items() if b is not None and b.is_floating_point()]
        self._master = {id(p): m for p, m in self.params}
        model.to(torch.bfloat16)  # in place: the same Parameter objects, now bf16

    def of(self, param: torch.Tensor) -> torch.Tensor:
        return self._master[id(param)]

    def take_grads(self) -> list[torch.Tensor]:
        """Move the model's bf16 gradients onto the fp32 weights, as fp32, into the buffers of the step before (a
        fresh 600 MB for ViT-B/32 each step cost twice the optimiser's own time); returns the weights that have one.
        """
        taken = []
        for p, master in self.params:
            if p.grad is None:
                master.grad = None  # not last step's: the optimiser skips it
                continue
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.copy_(p.grad)
            p.grad = None
            taken.append(master)
        return taken

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, master in self.params:
            if p.requires_grad:
                p.copy_(master)

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holding the fp32 weights themselves (no copy) for the duration."""
        kept = [p.data for p, _ in self.params]
        kept_buffers = [module._buffers[name] for module, name, _ in self.buffers]
        for p, master in self.params:
            p.data = master
        for (module, name, master), buffer in zip(self.buffers, kept_buffers):
            unchanged = torch.equal(buffer, master.to(buffer.dtype))
            module._buffers[name] = master if unchanged else buffer.float()  # e.g. running statistics
        try:
            yield
        finally:
            for (p, _), data in zip(self.params, kept):
                p.data = data
            for (module, name, _), buffer in zip(self.buffers, kept_buffers):
                module._buffers[name] = buffer


def _broadcast_weights(model: nn.Module) -> None:
    """Rank 0's weights and buffers onto every rank (each rank seeded its own initialisation)."""
    for tensor in model.state_dict().values():
        torch.distributed.broadcast(tensor, src=0)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


class TrainLoop:
    # torch's fused AdamW: one kernel over every tensor, 3x faster than its per-tensor loop on a CPU (ViT-B/32 CLIP's
    # 151M parameters: 0.09 s a step against 0.28, 2-core AMX Xeon), and the same update to 1.3e-7 (relative, after
    # 200 steps, groups of their own lr and decay). Not with FSDP's sharded parameters.
    fused_adamw = True

    def __init__(self, cfg: TrainConfig, resume: bool = False):
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
        if not cfg.data.train:
            raise RosettaError("no training data: set data.train (a manifest, a folder of records or shards)")
        self.run_dir = Path(cfg.out)
        self._seed(cfg.seed)
        self.resume_from = checkpoint.latest(self.run_dir) if resume else None
        self.compute_dtype = COMPUTE_DTYPES.get(cfg.precision, torch.float32)
        self.masters: MasterWeights | None = None
        self.step = 0

    def start(self, model: nn.Module, steps_per_epoch: int, flops_per_sample: float) -> None:
        """Take over the built model: restore a checkpoint's weights, wrap it for several processes, set up the
        optimiser over what it trains."""
        cfg = self.cfg
        if self.device.type == "cpu":
            keep_freed_memory()  # a step's activations reuse the last step's memory rather than fault in new pages
        self.model = model.to(self.device)
        # Weights are restored before sharding: FSDP shards whatever the model holds when it is wrapped.
        if self.resume_from is not None:
            from rosetta.models.io import read_weights

            self.load_weights(read_weights(self.resume_from, ("model.safetensors",)))
        if cfg.precision == "bf16-true":
            if self.sharded:
                raise RosettaError("precision bf16-true: not with fsdp (use bf16, autocast, there)")
            if self.world.size > 1:  # every rank's masters are rank 0's weights, as DDP's model copies will be
                _broadcast_weights(self.model)
            self.masters = MasterWeights(self.model)
        self.wrapped = self._wrap(self.model)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = max(1, int(cfg.epochs * steps_per_epoch))
        groups = self.param_groups()
        if self.masters:  # the optimiser updates the fp32 weights; the model's bf16 ones are copied from them
            groups = [{**g, "params": [self.masters.of(p) for p in g["params"]]} for g in groups]
        # None, not False: torch's own choice then (its multi-tensor loop on CUDA)
        self.fused = True if self.fused_adamw and not self.sharded and self.device.type in ("cpu", "cuda") else None
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=self.fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, self.total_steps, cfg.min_lr / cfg.lr if cfg.lr else 0.0)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.flops_per_sample = flops_per_sample
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device, self.compute_dtype)

    # What a trainer says.

    def loaders(self, epoch: int, position: int) -> list[DataLoader]:
        """The loaders of the rest of this epoch's steps; each step takes `accum_steps` batches from each."""
        raise NotImplementedError

    def train_step(self, micro_batches: list[list[Any]]) -> float:
        """One optimiser step (ending in `optimizer_step`); returns the loss, averaged over processes."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def log_extras(self) -> dict[str, float]:
        """What the training log shows beside the loss (temperatures, per-objective losses)."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (a group's "lr" overrides the recipe's; the schedule scales each)."""
        return param_groups(self.model, self.cfg.weight_decay)

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (the transformer blocks)."""
        return []

    def warm_up_sharded(self) -> None:
        """A first forward, which FSDP needs before it can take sharded optimiser state."""
        raise RosettaError("this trainer cannot resume an FSDP run")

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def extra_state(self) -> dict[str, Any]:
        """More to keep in a checkpoint's trainer.pt, restored by `restore_extra_state`."""
        return {}

    def restore_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def for_saving(self, model: nn.Module) -> nn.Module:
        """The model as a checkpoint and the final directory hold it (e.g. with LoRA merged)."""
        return model

    # Set-up.

    def _seed(self, seed: int) -> None:
        seed += self.world.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world.size == 1:
            return model
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            _broadcast_weights(model)  # every rank shards rank 0's weights, as DDP would use
            for unit in self.shard_units():
                fully_shard(unit)
            return fully_shard(model)
        if self.cfg.distributed != "ddp":
            raise RosettaError(f"distributed {self.cfg.distributed!r}: expected ddp or fsdp")
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

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

    def full_state_model(self) -> nn.Module | None:
        """The model with full (unsharded) weights on the main rank, for saving (every rank must call this)."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:  # the gathered weights land on rank 0 only
            return None
        with torch.device("meta"):
            copy = type(self.model)(self.model.config, tokenizer=self.model.tokenizer)
        copy.load_state_dict(state, assign=True)
        return copy

    def full_precision(self):
        """A context in which the model holds its fp32 weights (bf16-true keeps them beside it): what is saved."""
        return self.masters.swapped_in() if self.masters else contextlib.nullcontext()

    def master(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the optimiser updates for `param`: its fp32 weights under bf16-true, else itself."""
        return self.masters.of(param) if self.masters else param

    def save_checkpoint(self, epoch: int, position: int) -> None:
        with self.full_precision():
            self._save_checkpoint(epoch, position)

    def _save_checkpoint(self, epoch: int, position: int) -> None:
        model, optimizer = self.full_state_model(), self._optimizer_state()
        rng = [checkpoint.rng_state()]
        if self.world.size > 1:  # every rank's generators: each draws its own dropout masks and augmentations
            rng = [None] * self.world.size
            torch.distributed.all_gather_object(rng, checkpoint.rng_state())
        if self.world.is_main:
            state = {
                "step": self.step, "epoch": epoch, "position": position, "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "config": self.cfg.to_dict(), **self.extra_state(),
            }
            checkpoint.save(self.run_dir, self.step, self.for_saving(model), state, self.cfg.keep_checkpoints)
        if self.world.size > 1:
            torch.distributed.barrier()

    def _restore(self) -> tuple[int, int]:
        """Restore the training state of the checkpoint the weights came from; returns (epoch, batch position)."""
        path = self.resume_from
        if path is None:
            return 0, 0
        state = checkpoint.load_state(path)
        self.restore_extra_state(state)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            self.warm_up_sharded()
            self.model.reshard()  # the root keeps its weights gathered after forward; the optimiser holds shards
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:  # the saved groups bring the saving run's implementation
                group["fused"], group["foreach"] = self.fused, None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]  # a list, one per rank (a single state in checkpoints of earlier versions)
        checkpoint.set_rng_state(rng[min(self.world.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
        self.step = state["step"]
        if self.world.is_main:
            print(f"resumed from {path} (step {self.step})", flush=True)
        return state["epoch"], state["position"]

    # The step.

    def autocast(self):
        dtype = AUTOCAST.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def optimizer_step(self) -> None:
        """Clip, step, and move the schedule on: the end of every trainer's step."""
        trained = self.model.parameters()
        if self.masters:
            trained = self.masters.take_grads()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(trained, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.masters:
            self.masters.copy_to_model()  # their gradients stay, to be overwritten by the next step's
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def scored(self) -> dict[str, float]:
        """`evaluate` in eval mode, every rank in step (sharded weights gathered for it)."""
        self.model.eval()
        if self.sharded:  # the root's own weights are only gathered by its forward: gather them for the tasks
            self.model.unshard()
        results = self.evaluate()
        if self.sharded:
            self.model.reshard()
        self.model.train()
        return results

    # The loop.

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
            source = "--peak-tflops" if cfg.peak_tflops else describe_peak(self.device, self.compute_dtype)
            print(f"mfu: of a {self.peak / 1e9:.0f} GFLOP/s peak per process ({source})", flush=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.world.is_main, dynamic_ncols=True, mininterval=2.0)
        self.model.train()
        try:
            while self.step < self.total_steps:
                loaders = [iter(loader) for loader in self.loaders(epoch, position)]
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
                            "lr": cfg.lr * self.scheduler.lr_lambdas[0](self.step), "samples_per_s": speed,
                            "mfu": mfu,
                            **self.log_extras(),
                        })
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        log.log(self.step, "val", self.scored())
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint(epoch, position)
                if position >= self.steps_per_epoch:
                    epoch, position = epoch + 1, 0
                    if not cfg.eval_every:
                        log.log(self.step, "val", {"epoch": epoch, **self.scored()})
            self.save_checkpoint(epoch, position)
            final = self.run_dir / "model"
            with self.full_precision():
                model = self.full_state_model()
                if self.world.is_main:
                    self.for_saving(model).save_pretrained(final)
            return final
        finally:
            bar.close()
            log.close()

    @staticmethod
    def _next(loader: Iterator) -> Any:
        try:
            return next(loader)
        except InputError as e:
            reason = str(e).strip().splitlines()[-1].split("InputError: ")[-1]
            raise RosettaError(
                f"unreadable training sample: {reason} (remove it, e.g. with 'rosetta data clean', then --resume)"
            ) from None
