"""E2VPT prompt pruning (token-wise, then segment-wise) with rewinding.

Prunable modules: the prunable kinds of the registry (``module_specs.PRUNABLE_KINDS``: VPT-Deep
tokens ``vpt`` and E2VPT key/value prompt tokens ``kv_prompt``, shared or separate K/V); each
module's gate protocol (:class:`~noah_ray.nn.modules.PromptModule`: ``fix_gate``, ``take_tokens``)
does the per-kind work.  How training uses it (``train.retrain`` with a ``prune`` section)::

    torch.manual_seed(seed); model = build(...)          # E2VPT: vpt + kv_prompt widths
    train(model)                                          # first training run
    pruned, plan = prune(model, train_batches, PruneConfig(token_fraction=0.5))
    torch.manual_seed(seed); fresh = build(...)           # the same initial values again
    model2 = apply_plan(fresh, plan)                      # rewound: kept prompts at their init values
    train(model2)                                         # the e2vpt-pruned run, plan in meta.json

1. **Scores from mask gradients.**  Every prompt token (or segment of a token) gets a probe
   gate ``g = 1`` that multiplies its vector (VPT: the token; KV: its key and value); on
   training batches the importance is computed from ``dL/dg`` (see *Scores* below).  Only the
   gates get gradients (``torch.autograd.grad``); the model's ``.grad`` fields are untouched.
2. **Token-wise pruning.**  In each layer the lowest-scoring ``token_fraction`` of the tokens is
   dropped.  Dropped tokens are REMOVED: :func:`apply_plan` builds a smaller
   :class:`PromptedViT` holding only the kept tokens, re-indexed (in their original order) into
   the first ``m`` slots, so the sequence (VPT) or key length (KV prompts) shrinks and compute
   drops.  Its capacity is a plain :class:`SubnetConfig` whose layer width is the kept count
   ``m`` (a layer that had ``n`` tokens and keeps ``m`` has width ``m``), so ``extract``,
   ``SubnetConfig.param_count`` and (trainable) state dicts keep working unchanged.  The plan
   records the original index of every kept token (:attr:`PrunePlan.kept`).  Fractions are
   per layer and < 1, so every prompted layer keeps a token; a VPT layer also keeps
   ``min_vpt_tokens >= 1`` tokens (a VPT layer of width 0 would let the previous layer's
   prompts through instead of replacing them: a different network).  A plan that empties a
   KV-prompt layer (e.g. written by hand) is exact too: that layer gets no KV-prompt module.
3. **Segment-wise pruning.**  Each kept token's vector (VPT: ``dim``; KV: ``heads * head_dim``
   flattened head-major) is split into ``num_segments`` equal segments, scored the same way on
   the token-pruned model, and the lowest ``segment_fraction`` per layer is pruned.  A token's
   vector cannot be shortened for some of its features only, so pruned segments CANNOT be
   removed: they are zeroed and held at zero by a fixed 0/1 gate (the module's non-persistent
   ``gate`` buffer; zero value gradients keep them at zero while retraining).  They save
   parameters that matter (:meth:`PrunePlan.effective_params`) but no compute or memory.  A
   token whose segments are all pruned is removed like in step 2.
   Which features a segment covers and whether one mask serves all layers follow the model's
   recipe: E2VPT (recipes ``noah``, ``e2vpt``) uses strided pieces (feature ``f`` in piece
   ``f % num_segments``) and masks shared across layers (scores summed over layers, so every
   layer keeps the same tokens and pieces), on visual prompts only; recipe ``modern`` (our
   extension) uses contiguous segments and per-layer masks, on VPT and KV prompts.
4. **Rewinding.**  The model is built again under the first run's seed, so every trainable
   parameter holds its initial value, and :func:`apply_plan` keeps the plan's tokens (at their
   kept indices) of that fresh model; the result is retrained.  A saved pruned model is rebuilt
   at ``plan.config()``, its weights loaded and :func:`install_gates` called.

Removal vs zeroing: a zeroed token is NOT a removed token (a zero KV key still takes softmax
weight ``exp(0)``; a zero VPT token becomes a key through the LayerNorm bias).  The pruned model
equals the unpruned model with the pruned tokens masked out of attention (tested).

Scores: ``"abs"`` (default) is the mean over batches of ``|dL/dg|`` (the head-importance score
of Michel et al. that E2VPT follows); ``"signed"`` is the mean of ``-dL/dg`` (first-order
estimate of the loss increase when the token is zeroed).  ``abs`` is the default because it
kept accuracy better in a quick check (tiny ViT ``vit_noah_tiny_patch4_32``, frozen random
backbone, 4-class stripes task, VPT 10 + KV 6 tokens in all 12 layers, 300 AdamW steps at lr
1e-2; prune 50 % tokens + 25 % of 8 segments, rewind, retrain 300 steps; test accuracy):

    seed   unpruned   abs: pruned -> rewound+retrained   signed: pruned -> rewound+retrained
    0      0.754      0.443 -> 0.820                     0.350 -> 0.775
    1      0.916      0.328 -> 0.941                     0.299 -> 0.910

Two seeds only, so a hint, not proof.  Note that right after removal (before retraining) no
score did reliably better than random token choice there: mask gradients estimate the effect
of *scaling* a token, not of removing it from the softmax, so E2VPT's retraining is essential.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F

from noah_ray.config import PRUNABLE, PRUNE_SCORES, PruneConfig
from noah_ray.errors import ConfigError
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import MODULES, SubnetConfig, module_params
from noah_ray.space.kinds import SPECS, BackboneShape

SCORES = PRUNE_SCORES

#: (module, layer) -> scores of shape (tokens, segments)
Scores = dict[tuple[str, int], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PrunePlan:
    """Which tokens (indices into ``base``'s tokens) and segments survive.

    ``kept[module][layer]``: sorted original indices of the kept tokens (the pruned model holds
    them in this order in slots ``0..m-1``); ``segment_masks[module][layer]``: one row of
    ``num_segments`` 0/1 flags per kept token (absent or empty: no segment pruned).
    """

    base: SubnetConfig
    kept: dict[str, tuple[tuple[int, ...], ...]]
    num_segments: int = 1
    segment_masks: dict[str, tuple[tuple[tuple[int, ...], ...], ...]] = field(default_factory=dict)

    def config(self) -> SubnetConfig:
        """The pruned model's capacity: every pruned module's layer width = its kept count."""
        widths: dict[str, Any] = dict(self.base.to_dict())   # lists: SubnetConfig takes them
        for m, layers in self.kept.items():
            widths[m] = [len(k) for k in layers]
        return SubnetConfig(widths)

    def masks(self, module: str, layer: int) -> torch.Tensor | None:
        """(kept tokens, segments) float 0/1 gate, or None when no segment is pruned."""
        rows = self.segment_masks.get(module)
        if not rows or not rows[layer]:
            return None
        t = torch.tensor(rows[layer], dtype=torch.float32).reshape(-1, self.num_segments)
        return None if bool(t.all()) else t

    def effective_params(self, shape: BackboneShape, kv_shared: bool = False) -> int:
        """Trainable module parameters that can be non-zero (pruned segments excluded); the
        materialised count (``config().param_count``) still includes the zeroed segments."""
        total = self.config().param_count(shape, kv_shared).modules
        for m, layers in self.segment_masks.items():
            for i in range(len(layers)):
                mask = self.masks(m, i)
                if mask is not None:
                    zeroed = int((1 - mask).sum())
                    total -= zeroed * module_params(m, 1, shape, kv_shared) // self.num_segments
        return total

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "num_segments": self.num_segments,
                "kept": {m: [list(k) for k in ls] for m, ls in self.kept.items()},
                "segment_masks": {m: [[list(r) for r in layer] for layer in ls]
                                  for m, ls in self.segment_masks.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        try:
            plan = cls(SubnetConfig.from_dict(data["base"]),
                       {m: tuple(tuple(int(i) for i in k) for k in ls) for m, ls in data["kept"].items()},
                       int(data.get("num_segments", 1)),
                       {m: tuple(tuple(tuple(int(b) for b in r) for r in layer) for layer in ls)
                        for m, ls in data.get("segment_masks", {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"prune plan is malformed ({e!r}); save it with PrunePlan.to_dict") from None
        plan.validate()
        return plan

    def validate(self) -> None:
        """Kept indices must be sorted, unique and inside the base widths."""
        for m, layers in self.kept.items():
            widths = self.base.layer_widths(m)
            if len(layers) != len(widths):
                raise ConfigError(f"prune plan: {m} has {len(layers)} layers, the base {len(widths)}")
            for i, toks in enumerate(layers):
                if list(toks) != sorted(set(toks)) or any(not 0 <= t < widths[i] for t in toks):
                    raise ConfigError(f"prune plan: {m} layer {i} kept indices {list(toks)} must be "
                                      f"sorted, unique and below the base width {widths[i]}")


# ----------------------------------------------------------------------------- scoring
def _prunable(model: PromptedViT, modules: Iterable[str]):
    for m in modules:
        for i, w in enumerate(model.active.layer_widths(m)):
            if w > 0:
                yield m, i, model.module(m, i)


def _regate(gate: torch.Tensor, num_segments: int, layout: str) -> torch.Tensor:
    """A fixed ``(n, S_old)`` gate re-expressed with ``num_segments`` segments of ``layout``."""
    old = gate.shape[-1]
    if layout == "contiguous":
        return F.interpolate(gate.detach()[None].float(), size=num_segments, mode="nearest")[0]
    if num_segments % old:  # strided piece s lies inside old piece s % old only when old divides S
        raise ConfigError(f"strided pieces: {num_segments} segments cannot refine the existing {old}; "
                          f"use a multiple of {old}")
    return gate.detach().float().repeat(1, num_segments // old)


def _share(grads: list[torch.Tensor | None], targets: list, shared: bool) -> list[torch.Tensor | None]:
    """Per-layer gate gradients (active rows); with ``shared`` every layer of a module gets the
    sum over its layers: the gradient of one gate used by all of them (E2VPT's shared masks)."""
    grads = [None if g is None else g[: mod.active] for g, (_, _, mod) in zip(grads, targets)]
    if not shared:
        return grads
    out = list(grads)
    for m in {t[0] for t in targets}:
        idx = [j for j, t in enumerate(targets) if t[0] == m]
        widths = {targets[j][2].active for j in idx}
        if len(widths) > 1:
            raise ConfigError(f"shared pruning masks need the same number of {m} tokens in every layer "
                              f"(got {sorted(widths)}); set model.prune_shared: false")
        live = [grads[j] for j in idx if grads[j] is not None]
        total = torch.stack(cast("list[torch.Tensor]", live)).sum(0) if live else None
        for j in idx:
            out[j] = total
    return out


def mask_scores(model: PromptedViT, batches: Batches, *, num_segments: int = 1, score: str = "abs",
                loss_fn: LossFn = F.cross_entropy, modules: Iterable[str] = PRUNABLE,
                max_batches: int | None = None, shared: bool | None = None) -> Scores:
    """Importance of every active prompt token (``num_segments=1``) or token segment, from the
    gradient of the loss w.r.t. a multiplicative probe gate at 1 (an existing fixed gate is
    kept: already-pruned segments stay zero and score 0).  Runs in eval mode (no dropout).

    ``shared`` (default: the model's recipe, ``prune_shared``): one gate per module for all
    layers, as E2VPT; every layer then gets the same scores."""
    shared = model.recipe.prune_shared if shared is None else shared
    if score not in SCORES:
        raise ConfigError(f"score {score!r} unknown; use abs or signed")
    dim = model.shape.embed_dim
    if num_segments < 1 or dim % num_segments:
        raise ConfigError(f"num_segments {num_segments} must divide the embed dim {dim}; pick a divisor")
    targets = list(_prunable(model, modules))
    if not targets:
        raise ConfigError("the active subnet has no vpt / kv_prompt tokens to prune")
    saved = [(mod, mod.gate) for _, _, mod in targets]
    gates = []
    for _, _, mod in targets:
        g = torch.ones(mod.max_width, num_segments, device=next(mod.parameters()).device)
        if mod.gate is not None:  # keep fixed zeros (at the new segment granularity)
            g[: mod.gate.shape[0]] *= _regate(mod.gate, num_segments, mod.gate_layout).to(g.device)
        mod.gate = g.requires_grad_(True)
        gates.append(mod.gate)
    was_training = model.training
    model.eval()
    totals = [torch.zeros_like(g) for g in gates]
    n = 0
    try:
        for x, y in batches:
            if max_batches is not None and n >= max_batches:
                break
            dev = gates[0].device
            loss = loss_fn(model(x.to(dev)).float(), y.to(dev))
            grads = _share(list(torch.autograd.grad(loss, gates, allow_unused=True)), targets, shared)
            for t, gr in zip(totals, grads):
                if gr is not None:
                    t[: gr.shape[0]] += gr.abs() if score == "abs" else -gr
            n += 1
    finally:
        for mod, old in saved:
            mod.gate = old
        model.train(was_training)
    if n == 0:
        raise ConfigError("no batches to score prompts on; pass training batches")
    return {(m, i): (t[: mod.active] / n).detach().cpu() for (m, i, mod), t in zip(targets, totals)}


# ----------------------------------------------------------------------------- planning
def _drop_count(n: int, fraction: float, keep_min: int) -> int:
    return max(0, min(int(math.floor(fraction * n + 1e-9)), n - keep_min))


def _min_tokens(module: str, width: int, min_vpt_tokens: int) -> int:
    """Tokens a layer must keep: a kind whose empty layer passes the previous layer's tokens on
    (VPT) keeps ``min_vpt_tokens``, others may be emptied."""
    return min(width, min_vpt_tokens) if SPECS[module].passes_tokens_on else 0


def plan_tokens(scores: Scores, base: SubnetConfig, fraction: float, *, min_vpt_tokens: int = 1,
                modules: Iterable[str] = PRUNABLE) -> PrunePlan:
    """Drop the lowest-scoring ``fraction`` of the tokens in every layer of ``modules``
    (a token's score is the sum over its segments; ties keep the lower index)."""
    kept: dict[str, tuple[tuple[int, ...], ...]] = {}
    for m in modules:
        widths = base.layer_widths(m)
        if not any(widths):
            continue
        layers: list[tuple[int, ...]] = []
        for i, w in enumerate(widths):
            if w == 0:
                layers.append(())
                continue
            if (m, i) not in scores:
                raise ConfigError(f"no scores for {m} layer {i}; score the model at plan base {base.to_dict()}")
            s = scores[(m, i)].reshape(w, -1).sum(-1)
            drop = _drop_count(w, fraction, _min_tokens(m, w, min_vpt_tokens))
            order = torch.argsort(s, descending=True, stable=True)[: w - drop]
            layers.append(tuple(sorted(int(j) for j in order)))
        kept[m] = tuple(layers)
    return PrunePlan(base, kept)


def plan_segments(plan: PrunePlan, scores: Scores, fraction: float, num_segments: int, *,
                  min_vpt_tokens: int = 1) -> PrunePlan:
    """Zero the lowest-scoring ``fraction`` of segments in every layer of the token-pruned model
    (``scores`` were computed on ``apply_plan(model, plan)``); tokens left with no segment are
    removed (a VPT layer keeps at least ``min_vpt_tokens``, their best segment revived)."""
    kept: dict[str, tuple[tuple[int, ...], ...]]
    masks: dict[str, tuple[tuple[tuple[int, ...], ...], ...]]
    kept, masks = {}, {}
    for m, layers in plan.kept.items():
        new_layers: list[tuple[int, ...]]
        new_masks: list[tuple[tuple[int, ...], ...]]
        new_layers, new_masks = [], []
        for i, toks in enumerate(layers):
            if not toks:
                new_layers.append(())
                new_masks.append(())
                continue
            s = scores[(m, i)].reshape(len(toks), num_segments)
            mask = torch.ones_like(s)
            drop = _drop_count(s.numel(), fraction, 0)
            mask.view(-1)[torch.argsort(s.reshape(-1), stable=True)[:drop]] = 0
            alive = mask.any(-1)
            need = _min_tokens(m, len(toks), min_vpt_tokens) - int(alive.sum())
            if need > 0:  # revive the best segment of the best dead tokens
                dead = (~alive).nonzero().view(-1)
                best = dead[torch.argsort(s[dead].max(-1).values, descending=True)[:need]]
                for j in best.tolist():
                    mask[j, int(s[j].argmax())] = 1
                alive = mask.any(-1)
            idx = alive.nonzero().view(-1).tolist()
            new_layers.append(tuple(toks[j] for j in idx))
            new_masks.append(tuple(tuple(int(b) for b in mask[j].tolist()) for j in idx))
        kept[m], masks[m] = tuple(new_layers), tuple(new_masks)
    return replace(plan, kept=kept, num_segments=num_segments, segment_masks=masks)


# ----------------------------------------------------------------------------- apply
def apply_plan(model: PromptedViT, plan: PrunePlan) -> PromptedViT:
    """A standalone PromptedViT of capacity ``plan.config()`` holding only the kept tokens
    (first ``m`` slots, original order), pruned segments zeroed and held at zero by a fixed
    gate.  ``model`` (active at ``plan.base``) is left as it was."""
    plan.validate()
    for m in plan.kept:
        if tuple(model.active.layer_widths(m)) != tuple(plan.base.layer_widths(m)):
            raise ConfigError(f"the model's active {m} widths {list(model.active.layer_widths(m))} "
                              f"differ from the plan's base {list(plan.base.layer_widths(m))}; "
                              f"set_active(plan.base) first")
    for m in plan.kept:
        if any(getattr(model.module(m, i), "gate", None) is not None
               for i, w in enumerate(plan.base.layer_widths(m)) if w):
            raise ConfigError(f"the model's {m} prompts are already segment-pruned; prune the unpruned model")
    previous = model.active
    sub = model.extract(plan.config())
    model.set_active(previous)
    with torch.no_grad():
        for m, layers in plan.kept.items():
            for i, toks in enumerate(layers):
                if not toks:
                    continue
                src, dst = model.module(m, i), sub.module(m, i)
                assert src is not None and dst is not None     # kept tokens: both models have the module
                dst.take_tokens(src, torch.tensor(toks, device=next(dst.parameters()).device))
    install_gates(sub, plan)
    return sub


def install_gates(model: PromptedViT, plan: PrunePlan) -> None:
    """Zero the pruned segments of a model of capacity ``plan.config()`` and hold them at zero
    with fixed gates (call after loading a pruned model's weights)."""
    want = plan.config()
    if any(model.capacity.layer_widths(m) != want.layer_widths(m) for m in MODULES):
        raise ConfigError("the model's capacity is not the plan's pruned config; build it with plan.config()")
    with torch.no_grad():
        for m in plan.kept:
            for i in range(len(plan.kept[m])):
                gate = plan.masks(m, i)
                if gate is not None:
                    mod = model.module(m, i)
                    assert mod is not None                     # a gate: the layer has the module
                    mod.fix_gate(gate.to(next(mod.parameters()).device))


# ----------------------------------------------------------------------------- prune
def prune(model: PromptedViT, batches: Batches, config: PruneConfig = PruneConfig(), *,
          loss_fn: LossFn = F.cross_entropy) -> tuple[PromptedViT, PrunePlan]:
    """Token-wise then segment-wise pruning of a trained ``model`` (its active subnet).

    ``batches``: training ``(images, labels)``; the first ``config.score_batches`` are used by
    each scoring pass.  What is pruned (``config.modules``, default the recipe's), the piece
    layout and whether masks are shared across layers come from the model's recipe.  Returns
    the pruned model (trained values) and the plan; E2VPT then rewinds (see the module
    docstring) and retrains.
    """
    batches = list(itertools.islice(iter(batches), config.score_batches))
    base = model.active
    modules = config.modules or model.recipe.prune_modules
    tok = mask_scores(model, batches, num_segments=1, score=config.score, loss_fn=loss_fn, modules=modules)
    plan = plan_tokens(tok, base, config.token_fraction, min_vpt_tokens=config.min_vpt_tokens, modules=modules)
    if config.segment_fraction > 0 and config.num_segments > 1:
        staged = apply_plan(model, plan)
        mods = [m for m in plan.kept if any(len(k) for k in plan.kept[m])]
        if mods:
            seg = mask_scores(staged, batches, num_segments=config.num_segments, score=config.score,
                              loss_fn=loss_fn, modules=mods)
            plan = plan_segments(plan, seg, config.segment_fraction, config.num_segments,
                                 min_vpt_tokens=config.min_vpt_tokens)
    return apply_plan(model, plan), plan
