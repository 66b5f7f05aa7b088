"""The hot-path operations of the prompt modules, cheaper than their plain torch spelling and
equal in math.

* :func:`dropout`: inverted dropout (each element kept with probability ``1 - p`` and scaled by
  ``1 / (1 - p)``, independently).  On CPU the keep mask comes from numpy's SFC64 generator
  (32 random bits per element, kept when below ``round((1 - p) * 2**32)``), seeded by one draw
  from torch's default generator, so ``torch.manual_seed``, saved RNG states and checkpoint
  recomputation reproduce it; torch's CPU ``bernoulli_`` draws one Mersenne-Twister number per
  element and cost 4-5x more (docs/benchmarks.md).  Other devices use ``F.dropout``.
* :func:`splice`: ``cat([x[:, :start], p, x[:, start + n_old:]], 1)`` whose backward writes the
  input gradient in one pass (autograd's two slice-backwards zero-fill and add two full copies).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``x * mask / (1 - p)``, mask i.i.d. Bernoulli(``1 - p``); ``x`` itself when not training
    or ``p == 0``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    n = x.numel()
    words = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    keep = torch.from_numpy(words < np.uint32(round((1.0 - p) * 2.0**32)))
    noise = keep.view(x.shape).to(x.dtype).div_(1.0 - p)   # F.dropout's noise: 0 or 1 / (1 - p)
    return x * noise


class _Splice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor | None, start: int, n_old: int) -> torch.Tensor:
        n_new = 0 if p is None else p.shape[1]
        ctx.shape, ctx.start, ctx.n_old, ctx.n_new = x.shape, start, n_old, n_new
        parts = [x[:, :start]] + ([p] if p is not None else []) + [x[:, start + n_old:]]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        s, n_old, n_new = ctx.start, ctx.n_old, ctx.n_new
        gx = gp = None
        if ctx.needs_input_grad[0]:
            gap = g.new_zeros(g.shape[0], n_old, *g.shape[2:])
            gx = torch.cat([g[:, :s], gap, g[:, s + n_new:]], dim=1)
        if ctx.needs_input_grad[1]:
            gp = g[:, s:s + n_new]
        return gx, gp, None, None


def splice(x: torch.Tensor, p: torch.Tensor | None, start: int, n_old: int) -> torch.Tensor:
    """``x`` with its ``n_old`` tokens from ``start`` (dim 1) replaced by ``p`` (none if None)."""
    return _Splice.apply(x, p, start, n_old)
