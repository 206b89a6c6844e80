"""Reading checkpoint weights safely, and choosing the device and dtype a model runs in."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from rosetta.errors import RosettaError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); without it bf16 is slower than fp32."""
    return bool(set(cpuinfo("flags").split()) & {"avx512_bf16", "amx_bf16"})


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16, where bf16 matrix products outrun int8 (AVX512-BF16 alone: not)."""
    return "amx_bf16" in cpuinfo("flags").split()


def cpu_isa() -> str:
    """The widest matrix instruction set this CPU has, as the benchmarks name it: AMX, AVX512-BF16, AVX512, AVX2."""
    flags = set(cpuinfo("flags").split())
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return "?"


def cpuinfo(field: str) -> str:
    """The value of `field` for the first CPU in /proc/cpuinfo; "" where it is absent or unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.startswith(field)), "")
    return line.split(":", 1)[-1].strip()


_ALLOCATOR_TUNED: bool | None = None


def release_openmp_threads() -> bool:
    """Free the OpenMP threads this thread's parallel work started (they start again if it does more); returns
    whether it could (torch's OpenMP runtime found, its `omp_pause_resource_all` there).

    Call it in the thread that loaded a model which then runs on another thread (a server's model worker). libgomp
    lets a team's threads spin between parallel regions only while it manages no more threads than there are CPUs;
    the loading thread's idle team counts, so the worker's team sleeps and wakes at every region instead. Measured
    (bf16 ViT-B/32 on a 2-core AMX Xeon, batch 32): 135-165 images/s on a worker thread with the loader's team
    kept, 180-190 with it freed, as on the loading thread itself.
    """
    try:
        with open("/proc/self/maps") as maps:
            runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
        if not runtimes:
            return False
        # torch's own (its wheel bundles one), where other libraries brought theirs too
        runtime = min(runtimes, key=lambda path: not path.startswith(os.path.dirname(torch.__file__) + os.sep))
        pause = ctypes.CDLL(runtime).omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    return pause(1) == 0  # omp_pause_soft: the threads go, the runtime stays


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of handing them back to the system, once per
    process; returns whether it did (not on other C libraries, nor with ROSETTA_KEEP_FREED_MEMORY=0).

    A CPU forward pass allocates activations of megabytes, layer after layer. By default glibc maps each from the
    system afresh and unmaps it when freed, so every layer's output is written into new pages, one page fault at a
    time. Kept, the same blocks serve every batch: bf16 ViT-B/32 on a 2-core AMX Xeon, batch 32, in a process
    running only Rosetta: 125-135 images/s by default, 165-172 with freed memory kept (texts +10%). The cost: the
    process holds on to its peak heap rather than returning it (up to 1 GiB free in the main heap and in each
    thread's arena). Process-wide, so the `rosetta` commands and the trainer turn it on; a program using
    Rosetta as a library calls `rosetta.keep_freed_memory()` if it wants it.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is None:
        _ALLOCATOR_TUNED = False
        if os.environ.get("ROSETTA_KEEP_FREED_MEMORY", "1") != "0":
            try:
                libc = ctypes.CDLL("libc.so.6")
                trimmed = libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB free at the heap's top
                mapped = libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MiB come from the heap
                _ALLOCATOR_TUNED = bool(trimmed and mapped)
            except (OSError, AttributeError):  # not glibc
                pass
    return _ALLOCATOR_TUNED


def place(model, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """`model` on `device` in `dtype`; "int8" quantises its linear layers for the CPU (rosetta.nn.quantize).

    `"auto"` is the fastest path that keeps the model's answers: on CUDA and AMX CPUs bf16; on other CPUs int8 for
    a family that says int8 keeps its answers (`int8_when_auto`: the contrastive models, whose int8 embeddings stay
    within cosine 0.99 of fp32 and give the same zero-shot class, benchmarks/int8.py), else bf16 where the CPU
    multiplies it natively (AVX512-BF16), else fp32. Measured with benchmarks/embed.py (ViT-B/32 images, 2 cores):
    AMX Xeon bf16 4.7-5.9x open_clip fp32, int8 2.4-3.1x; AVX512-BF16 EPYC bf16 2.2x, int8 3.1x; AVX2 EPYC int8
    1.6-1.8x.
    """
    device = resolve_device(device)
    if dtype == "auto" and device.type == "cpu" and not cpu_has_amx() and getattr(model, "int8_when_auto", False):
        dtype = "int8"
    if dtype == "int8":
        if device.type != "cpu":
            raise RosettaError("dtype int8 is a CPU path (fbgemm); on a GPU use bf16 or fp16")
        from rosetta.nn.quantize import quantize

        return quantize(model.to("cpu"))
    return model.to(device=device, dtype=resolve_dtype(dtype, device))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`"auto"` is the fast path: bf16 (fp16 on older GPUs) on CUDA, bf16 on CPUs with native bf16, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise RosettaError(f"unknown dtype {dtype!r} (expected auto, fp32, bf16, fp16 or int8)")
    return _DTYPES[dtype]


def read_weights(directory: Path, candidates: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors from the first weight file present: safetensors (also sharded), else a pickle read with weights_only."""
    for name in candidates:
        path = directory / name
        index = directory / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _read_file(directory / shard).items()}
        if path.exists():
            return _read_file(path)
    raise RosettaError(f"{directory}: no weights found (looked for {', '.join(candidates)})")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means we will not trust this file
        raise RosettaError(f"{path}: not a plain tensor checkpoint, refusing to unpickle it ({e})") from None
    return state.get("state_dict", state)


__all__ = ["read_weights", "resolve_dtype", "resolve_device", "cpu_has_fast_bf16"]
