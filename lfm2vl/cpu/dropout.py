"""Fast dropout for CPU training: one native pass, and no mask kept for the backward pass.

    use_fast_dropout(model)   # every LoRA layer's nn.Dropout becomes a FastDropout (same object, same p)

torch's dropout draws a Bernoulli mask with its sequential CPU generator, then multiplies twice, and keeps the mask
for the backward pass. FastDropout draws one seed from torch's default generator per call and lets the native
kernel (kernels/dropout.cpp) hash (seed, element index) into the mask while it scales x; the backward pass
regenerates the same mask from the seed. torch.manual_seed therefore controls the masks, and gradient
checkpointing (which restores the RNG state before it recomputes a layer) draws the same seed, hence the same mask.
Anything the kernel does not take (not on the CPU, not fp32/bf16, not contiguous, in-place, p = 0 or 1, no native
library) runs nn.Dropout's own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return kernels.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad if grad.is_contiguous() else grad.contiguous()
        return kernels.dropout(g, ctx.p, ctx.seed), None, None


def runs_natively(x: torch.Tensor, p: float, inplace: bool = False) -> bool:
    """Whether FastDropout's kernel takes x (otherwise nn.Dropout's forward runs)."""
    return (0 < p < 1 and not inplace and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous() and kernels.available())


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x through the kernel, the seed drawn from torch's default CPU generator.
    The caller checks `runs_natively` first."""
    seed = int(torch.randint(2 ** 62, (), dtype=torch.int64))
    return _HashDropout.apply(x, p, seed)


class FastDropout(nn.Dropout):
    """nn.Dropout whose training-mode forward runs the hashed-mask kernel on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and runs_natively(x, self.p, self.inplace):
            return dropout(x, self.p)
        return super().forward(x)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap the class of every LoRA layer's `lora_dropout` nn.Dropout for FastDropout (parameters, state-dict and
    module paths unchanged); returns how many were swapped."""
    n = 0
    for m in model.modules():
        d = getattr(m, "lora_dropout", None)
        if type(d) is nn.Dropout:
            d.__class__ = FastDropout
            n += 1
    return n
