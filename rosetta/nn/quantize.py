"""int8 inference on CPUs: linear layers with int8 weights (one scale per output channel) and int8
activations quantised at every call (`torch.ops.quantized.linear_dynamic`): fbgemm's kernels for products
of few rows (decoding), oneDNN's for many (prefill, image batches).

Why these ops and not torchao's: on a CPU without AVX512-VNNI or AMX (an AVX2 EPYC, measured), torchao's
int8 path multiplies through `torch._int_mm`, 50x slower than fp32, while fbgemm's AVX2 kernels are 1.3x
(large batches) to 8x (one token at a time, where fp32 reads four bytes per weight) faster than MKL's fp32.
Activations use 7 of their 8 bits (`reduce_range`): AVX2's int8 products saturate otherwise.

`quantize(model)` swaps every linear layer (and a tied output projection) for its int8 form, in place.
Convolutions, norms and embeddings stay as they are. A quantised model runs in fp32 between its int8
products; it is for inference, and is saved by saving the model it was made from.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import nn

_ENGINES = set(torch.backends.quantized.supported_engines)
LARGE_ROWS = 256  # from here on oneDNN's int8 product beats fbgemm's (measured: AMD EPYC, AVX2, 2 threads)

# torch.compile cannot trace the packed-weights objects the quantised kernels take, so a compiled graph (the
# decode step, `rosetta.generation`) calls them through this op, which names a layer's weights by a number.
_PACKED: dict[int, tuple[object, object | None, int]] = {}  # handle: (fbgemm's, oneDNN's or None, out_features)
_HANDLES = itertools.count()
_LIBRARY = torch.library.Library("rosetta", "DEF")
_LIBRARY.define("int8_linear(Tensor x, int handle) -> Tensor")


def _int8_product(x: torch.Tensor, handle: int) -> torch.Tensor:
    packed, packed_large, _ = _PACKED[handle]
    if packed_large is not None and x.shape[0] > LARGE_ROWS:  # the last row is the range anchor
        packed = packed_large
    return torch.ops.quantized.linear_dynamic.default(x, packed, True)


_LIBRARY.impl("int8_linear", _int8_product, "CPU")


@torch.library.register_fake("rosetta::int8_linear")
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _PACKED[handle][2])


def _prepack(q: torch.Tensor, bias: torch.Tensor | None, engine: str):
    """`q` packed for `engine`'s kernels (the packed object then runs them whatever the default engine)."""
    default = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        return torch.ops.quantized.linear_prepack(q, bias)
    finally:
        torch.backends.quantized.engine = default


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().float().cpu()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
        self._bias = None if bias is None else bias.detach().float().cpu()  # added after the rows are rescaled
        self._anchor = torch.zeros(1, self.in_features)
        self._anchor[0, :2] = torch.tensor([1.0, -1.0])
        with warnings.catch_warnings():  # torch marks its quantised tensors deprecated; its kernels are what it has
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
            self._packed = _prepack(q, None, "fbgemm")
            # oneDNN's kernels are 10-20% faster than fbgemm's from a few hundred rows on, 2-3x slower below:
            # a second copy of the weights, in its layout, for the large products (prefill, image batches).
            self._packed_large = _prepack(q, None, "onednn") if "onednn" in _ENGINES else None
        self._register()

    def _register(self) -> None:
        """A handle of this layer's own for its packed weights, given up when the layer is freed."""
        self._handle = next(_HANDLES)
        _PACKED[self._handle] = (self._packed, self._packed_large, self.out_features)
        weakref.finalize(self, _PACKED.pop, self._handle, None)

    def __setstate__(self, state) -> None:  # a deep copy or an unpickled layer: a handle of its own
        super().__setstate__(state)
        self._register()

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().detach()  # inference only: the int8 product has no gradient
        n = len(rows)
        # The kernels quantise their whole input with one scale, so a row's result would depend on the rows beside
        # it (an image on its batch, a sequence on the others decoding with it). Each row is scaled to a peak of 1
        # and a last row holding -1 and +1 pins the range: per-row scales, and a product of each row alone.
        peak = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # the inf-norm, 3x faster than vector_norm's
        scaled = torch.cat((rows / peak, self._anchor))
        if torch.compiler.is_compiling():
            y = torch.ops.rosetta.int8_linear(scaled, self._handle)[:n] * peak
        else:  # the op's own Python dispatch costs 20 us a call, a fifth of a decode step's product
            y = _int8_product(scaled, self._handle)[:n].mul_(peak)
        if self._bias is not None:
            y.add_(self._bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` (on the CPU) by an Int8Linear; also the output projection
    of a (sub)model whose logits reuse its embedding (its `tied_output_weight()`, into its `int8_head`)."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 is a CPU path (fbgemm); on a GPU use bf16 or fp16")
    model.float()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.of(child))
    for module in model.modules():  # the model, or its language model (a vision-language model's)
        tied = module.tied_output_weight() if callable(getattr(module, "tied_output_weight", None)) else None
        if tied is not None:
            module.int8_head = Int8Linear(tied)
    model.quantized = True
    return model
