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
* :func:`thin_linear`: ``base + alpha * x @ W.T + bias`` for a weight with one small side (LoRA's
  ``A`` and ``B``, an adapter's down and up projections).  CPU BLAS is slow (4-6x) at products
  whose result is ``(many rows, r)`` for small ``r`` (``g @ B``, ``g.T @ h``: the gradients
  autograd forms for a rank-``r`` product); each such product is formed as the transpose of
  ``(r, many)`` instead.  Same products, summed in another order.

Under ``torch.compile`` each is its plain torch expression (the compiler fuses those itself and
traces neither the custom autograd functions nor numpy's generator); the dropout then draws its
mask with torch's generator, the same distribution from another stream.
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
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    seed = int(torch.empty((), dtype=torch.int64).random_())
    n = x.numel()
    words = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    keep = torch.from_numpy(words < np.uint32(round((1.0 - p) * 2.0**32)))
    noise = keep.view(x.shape).to(x.dtype).div_(1.0 - p)   # F.dropout's noise: 0 or 1 / (1 - p)
    return x * noise


def _spliced(x: torch.Tensor, p: torch.Tensor | None, start: int, n_old: int) -> torch.Tensor:
    """The spliced sequence in plain torch ops (autograd's own backward: two slice-backwards)."""
    return torch.cat([x[:, :start]] + ([p] if p is not None else []) + [x[:, start + n_old:]], dim=1)


class _Splice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor | None, start: int, n_old: int) -> torch.Tensor:
        n_new = 0 if p is None else p.shape[1]
        ctx.shape, ctx.start, ctx.n_old, ctx.n_new = x.shape, start, n_old, n_new
        return _spliced(x, p, start, n_old)

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


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` formed as ``(b.T @ a.T).T``: fast on CPU when ``b`` has few columns."""
    return torch.mm(b.t(), a.t()).t()


class _ThinLinear(torch.autograd.Function):
    """``base + alpha * x2 @ w.T + bias`` on 2-D ``x2``; ``w`` is ``(out, in)`` with a small side."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, base: torch.Tensor | None,
                alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x2, w)
        ctx.alpha, ctx.has_bias = alpha, bias is not None
        if w.shape[0] < w.shape[1]:                        # small output (r, in): (r, M) then transposed
            y = _mm_t(x2, w.t())
            y = y * alpha if alpha != 1.0 else y
            y = y if base is None else base + y
            return y if bias is None else y + bias
        start = base if base is not None else bias
        if start is None:
            return torch.mm(x2, w.t()).mul_(alpha) if alpha != 1.0 else torch.mm(x2, w.t())
        y = torch.addmm(start, x2, w.t(), alpha=alpha)
        return y.add_(bias) if base is not None and bias is not None else y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x2, w = ctx.saved_tensors
        gx = gw = gb = None
        if w.shape[0] < w.shape[1]:                        # g (M, r): plain products are fast
            if ctx.needs_input_grad[0]:
                gx = torch.mm(g, w)
            if ctx.needs_input_grad[1]:
                gw = torch.mm(g.t(), x2)
        else:                                              # x2 (M, r), g (M, out): transposed products
            if ctx.needs_input_grad[0]:
                gx = torch.mm(w.t().contiguous(), g.t()).t()
            if ctx.needs_input_grad[1]:
                gw = torch.mm(x2.t(), g).t()
        if ctx.alpha != 1.0:
            gx = gx * ctx.alpha if gx is not None else None
            gw = gw * ctx.alpha if gw is not None else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, g if ctx.needs_input_grad[3] else None, None


def _plain_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, base: torch.Tensor | None,
                  alpha: float) -> torch.Tensor:
    """:func:`thin_linear` in plain torch ops, the ones the modules used before it (autocast casts
    each of them: an adapter in a bf16 model stays bf16)."""
    if base is not None and bias is None:           # LoRA's B product: one addmm into the layer's output
        flat = torch.addmm(base.reshape(-1, w.shape[0]), x.reshape(-1, x.shape[-1]), w.t(), alpha=alpha)
        return flat.view(base.shape)
    y = F.linear(x, w, bias if alpha == 1.0 else None)
    if alpha != 1.0:
        y = y * alpha
        y = y if bias is None else y + bias.to(y.dtype)
    return y if base is None else base + y


def thin_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                base: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """``base + alpha * F.linear(x, w) + bias`` (``base`` shaped like the result, optional) for a
    weight ``w`` with one small side; products arranged for CPU BLAS (module docstring).  Under
    autocast or off the CPU it is the plain torch expression."""
    if x.device.type != "cpu" or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
        return _plain_linear(x, w, bias, base, alpha)
    lead = x.shape[:-1]
    flat_base = None if base is None else base.reshape(-1, w.shape[0])
    y = _ThinLinear.apply(x.reshape(-1, x.shape[-1]), w, bias, flat_base, alpha)
    return y.view(*lead, w.shape[0])


def splice(x: torch.Tensor, p: torch.Tensor | None, start: int, n_old: int) -> torch.Tensor:
    """``x`` with its ``n_old`` tokens from ``start`` (dim 1) replaced by ``p`` (none if None)."""
    if torch.compiler.is_compiling():
        return _spliced(x, p, start, n_old)
    return _Splice.apply(x, p, start, n_old)
