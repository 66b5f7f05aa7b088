"""A frozen timm ViT carrying prompt modules in every block.

:class:`PromptedViT` wraps any timm ``VisionTransformer``.  Its *capacity* (a
:class:`~noah_ray.space.SubnetConfig`) fixes how wide each module is in each layer; the
*active* config (``set_active``) picks a subnet inside it by slicing (weight entanglement).
A supernet is a PromptedViT at the search space's maximum capacity; ``extract(cfg)`` builds a
standalone PromptedViT whose capacity is exactly ``cfg``, holding only the active weights.

The *recipe* (:mod:`noah_ray.space.recipes`, default ``noah``) fixes the module math that differs
between the original code and modern practice: adapter activation, dropouts, drop-path
placement, inits, K/V sharing and the pruning-gate layout.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, cast

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from noah_ray.errors import ConfigError
from noah_ray.nn.backbones import backbone_shape, create_backbone
from noah_ray.nn.modules import REGISTRY, BuildContext, DeepPrompt, PromptModule, legacy_names, timm_attention
from noah_ray.nn.modules.fast_ops import splice
from noah_ray.space import ADAPTER, KV_PROMPT, LORA, MODULES, VPT, SearchSpace, SubnetConfig
from noah_ray.space.recipes import Recipe, as_recipe

PRECISIONS = ("fp32", "bf16", "fp16")

#: the order modules are created in (it fixes which random numbers each init draws, as in v1)
BUILD_ORDER: tuple[str, ...] = (LORA, KV_PROMPT, ADAPTER, VPT)


class PromptBlock(nn.Module):
    """One timm block with its prompt modules; inserts this layer's VPT tokens first.

    ``num_in`` (prompt tokens entering) and ``strip`` (remove prompts after the block, set on
    the last block) are fixed by ``set_active`` so the block is a plain ``x -> x`` function and
    timm's ``checkpoint_seq`` applies unchanged.  The modules attach themselves
    (:meth:`~noah_ray.nn.modules.PromptModule.attach`); ``vpt`` holds the VPT tokens.

    Its state dict keeps the tensor names checkpoints were written with
    (:func:`~noah_ray.nn.modules.legacy_names`), whatever the attention's current wrapping.
    """

    block: Any                    # the timm block: its submodules are reached by name
    vpt: DeepPrompt | None

    def __init__(self, block: nn.Module, num_prefix: int) -> None:
        super().__init__()
        self.block = block
        self.vpt = None
        self.num_prefix = num_prefix
        self.num_in = 0
        self.num_out = 0
        self.strip = False
        self.register_state_dict_post_hook(_write_legacy_names)
        self.register_load_state_dict_pre_hook(_read_legacy_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vpt is not None and self.vpt.active > 0:
            x = self.vpt.insert(x, self.num_prefix, self.num_in)
        x = self.block(x)
        if self.strip and self.num_out:
            x = splice(x, None, self.num_prefix, self.num_out)
        return x


def _attn_names(pblock: PromptBlock, prefix: str) -> dict[str, str]:
    """Full current name -> written name of the block's attention tensors."""
    p = prefix + "block.attn."
    return {p + k: p + v for k, v in legacy_names(pblock.block.attn).items() if k != v}


def _write_legacy_names(module: PromptBlock, state_dict: dict, prefix: str, local_metadata) -> None:
    names = _attn_names(module, prefix)
    for k in [k for k in state_dict if k.startswith(prefix)]:  # re-inserted in order
        state_dict[names.get(k, k)] = state_dict.pop(k)


def _read_legacy_names(module: PromptBlock, state_dict: dict, prefix: str, *args) -> None:
    for new, old in _attn_names(module, prefix).items():
        if old in state_dict:
            state_dict[new] = state_dict.pop(old)


def _module(block: PromptBlock, name: str) -> PromptModule | None:
    return REGISTRY[name].find(block)


class PromptedViT(nn.Module):
    """A timm ViT with prompt modules; only modules and head train (unless ``train_backbone``)."""

    # set on a model loaded from a subnet artifact (noah_ray.interop.artifact.load_subnet)
    backbone_overrides: tuple[str, ...]
    merged_lora_subnet: dict[str, Any] | None

    def __init__(self, backbone: VisionTransformer, capacity: SubnetConfig, *, lora_scale: float = 1.0,
                 kv_shared: bool | None = None, train_backbone: bool = False,
                 recipe: Recipe | str | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise ConfigError(f"backbone must be a timm VisionTransformer, got {type(backbone).__name__}")
        depth = len(backbone.blocks)
        if capacity.num_layers != depth:
            raise ConfigError(f"capacity has {capacity.num_layers} layers, backbone {depth}; "
                              f"give one width per backbone layer")
        self.shape = backbone_shape(backbone)
        recipe = as_recipe(recipe)
        if kv_shared is not None and kv_shared != recipe.kv_shared:
            recipe = dataclasses.replace(recipe, kv_shared=kv_shared)
        self.recipe = recipe
        self.lora_scale, self.kv_shared, self.train_backbone = lora_scale, recipe.kv_shared, train_backbone
        self.capacity = capacity
        self.vit = backbone
        self.vit.requires_grad_(train_backbone)
        self.vit.head.requires_grad_(True)
        self.vit.blocks = nn.Sequential(*(self._wrap_block(blk, capacity, i) for i, blk in enumerate(backbone.blocks)))
        self.grad_checkpointing = False
        self.checkpoint_blocks: int | None = None       # checkpointed blocks from the first (None: all)
        self.precision = "fp32"
        self.set_active(capacity)

    def _wrap_block(self, blk: nn.Module, capacity: SubnetConfig, i: int) -> PromptBlock:
        """Timm block ``i`` with this layer's prompt modules, built as the recipe says."""
        patch = self.vit.patch_embed.patch_size
        ctx = BuildContext(self.shape, self.recipe, self.lora_scale, int(patch[0]) * int(patch[1]))
        built = {m: REGISTRY[m].build(w, ctx) for m in BUILD_ORDER if (w := capacity.layer_widths(m)[i])}
        pb = PromptBlock(blk, self.vit.num_prefix_tokens)
        for m, cls in REGISTRY.items():
            if m in built:
                cls.attach(pb, built[m], self.recipe)
        return pb

    # ------------------------------------------------------------ factories
    @classmethod
    def supernet(cls, model_name: str, num_classes: int, space: SearchSpace, checkpoint: str | None = None,
                 **kwargs) -> PromptedViT:
        """The supernet of ``space``: every module at maximum width in every layer up to its
        largest depth."""
        timm_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("drop_path_rate", "img_size")}
        vit = create_backbone(model_name, num_classes, checkpoint, **timm_kwargs)
        if space.num_layers != len(vit.blocks):
            raise ConfigError(f"search space has {space.num_layers} layers, {model_name} has "
                              f"{len(vit.blocks)}; set num_layers: {len(vit.blocks)}")
        return cls(vit, space.largest(), **kwargs)

    # --------------------------------------------------------------- active
    @property
    def blocks(self) -> list[PromptBlock]:
        return list(cast("list[PromptBlock]", self.vit.blocks))

    def module(self, name: str, layer: int) -> PromptModule | None:
        return _module(cast(PromptBlock, self.vit.blocks[layer]), name)

    def set_active(self, cfg: SubnetConfig) -> None:
        """Activate a subnet; every width must fit the capacity of its layer."""
        if cfg.num_layers != self.capacity.num_layers:
            raise ConfigError(f"subnet has {cfg.num_layers} layers, the model {self.capacity.num_layers}")
        for m in cfg.widths:
            cap = self.capacity.layer_widths(m)
            for i, w in enumerate(cfg.layer_widths(m)):
                if w > cap[i]:
                    raise ConfigError(f"{m} layer {i}: width {w} exceeds the model's capacity {cap[i]}")
        num_prompts = 0
        for i, blk in enumerate(cast("list[PromptBlock]", self.vit.blocks)):
            for m in MODULES:
                mod = _module(blk, m)
                if mod is not None:
                    mod.set_width(cfg.layer_widths(m)[i])
            blk.num_in = num_prompts
            if cfg.layer_widths(VPT)[i] > 0:
                num_prompts = cfg.layer_widths(VPT)[i]
            blk.num_out = num_prompts
            blk.strip = False
        cast(PromptBlock, self.vit.blocks[-1]).strip = True
        self.active = cfg

    # ---------------------------------------------------------------- extract
    def extract(self, cfg: SubnetConfig | None = None) -> PromptedViT:
        """A standalone model whose capacity is exactly ``cfg`` (default: the active config),
        holding copies of the active slices of every module and the head."""
        cfg = cfg or self.active
        self.set_active(cfg)
        vit = copy.deepcopy(self._plain_backbone())
        sub = PromptedViT(vit, cfg, lora_scale=self.lora_scale, train_backbone=self.train_backbone,
                          recipe=self.recipe)
        with torch.no_grad():
            for i, (src, dst) in enumerate(zip(cast("list[PromptBlock]", self.vit.blocks),
                                               cast("list[PromptBlock]", sub.vit.blocks))):
                for m in MODULES:
                    w = cfg.layer_widths(m)[i]
                    if w:
                        s, d = _module(src, m), _module(dst, m)
                        assert s is not None and d is not None    # width w > 0: both have the module
                        for name, t in s.sliced_state(w).items():
                            getattr(d, name).copy_(t)
                        if getattr(s, "gate", None) is not None:  # fixed pruning gate (prune.py)
                            d.gate = cast(torch.Tensor, s.gate)[:w].detach().clone()
        sub.grad_checkpointing, sub.checkpoint_blocks = self.grad_checkpointing, self.checkpoint_blocks
        sub.precision = self.precision
        sub.set_fused_attn(cast(PromptBlock, self.vit.blocks[0]).block.attn.fused_attn)
        self.set_active(cfg)
        return sub

    def _plain_backbone(self) -> VisionTransformer:
        """A deep copy of the timm ViT with the prompt modules taken out again."""
        vit = copy.deepcopy(self.vit)
        blocks = []
        for pb in cast("list[PromptBlock]", vit.blocks):
            for cls in reversed(REGISTRY.values()):  # unwrap in the reverse order of attaching
                cls.detach(pb.block)
            blocks.append(pb.block)
        vit.blocks = nn.Sequential(*blocks)
        return vit

    def backbone(self) -> VisionTransformer:
        """The wrapped ViT without prompt modules (shares no tensors with this model)."""
        return self._plain_backbone()

    # ---------------------------------------------------------------- params
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains: modules and head (plus the backbone when ``train_backbone``)."""
        names = self._trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in names}

    def _trainable_names(self) -> set[str]:
        return {k for k, v in self.state_dict(keep_vars=True).items()
                if isinstance(v, nn.Parameter) and v.requires_grad}

    def state_keys(self, module: nn.Module) -> dict[str, str]:
        """``module``'s own state-dict names -> this model's state-dict keys of the same tensors."""
        ids = {id(v): k for k, v in self.state_dict(keep_vars=True).items()}
        return {n: ids[id(t)] for n, t in module.state_dict(keep_vars=True).items()}

    def qkv_linear(self, layer: int) -> nn.Linear:
        """The frozen fused qkv linear layer of block ``layer`` (without its LoRA)."""
        qkv: Any = timm_attention(cast(PromptBlock, self.vit.blocks[layer]).block).qkv
        return getattr(qkv, "base", qkv)

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm exempts from weight decay (``VisionTransformer.no_weight_decay``)."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self._trainable_names()
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ConfigError(f"trainable state does not fit this model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}; use the same backbone and space")
        self.load_state_dict(state, strict=False)

    def num_trainable(self) -> dict[str, int]:
        """Trainable parameter count per module and head, as materialised."""
        out = {m: 0 for m in MODULES}
        for blk in cast("list[PromptBlock]", self.vit.blocks):
            for m in MODULES:
                mod = _module(blk, m)
                if mod is not None:
                    out[m] += sum(p.numel() for p in mod.parameters() if p.requires_grad)
        out["head"] = sum(p.numel() for p in self.vit.head.parameters())
        return out

    # --------------------------------------------------------------- switches
    def set_grad_checkpointing(self, enable: bool = True, blocks: int | None = None) -> None:
        """Per-block non-reentrant checkpointing (prompt insertion happens inside each block) of the
        first ``blocks`` blocks (None: all).  The others keep their activations: each block left
        out saves one block's recomputation in the backward and keeps one block's activations."""
        depth = len(self.vit.blocks)
        whole = isinstance(blocks, int) and not isinstance(blocks, bool)
        if blocks is not None and not (whole and 0 <= blocks <= depth):
            raise ConfigError(f"model.checkpoint_blocks: {blocks!r} must be a whole number from 0 to the model's "
                              f"{depth} blocks (or unset: all)")
        self.grad_checkpointing, self.checkpoint_blocks = enable, blocks

    def set_fused_attn(self, enable: bool = True) -> None:
        for blk in cast("list[PromptBlock]", self.vit.blocks):
            blk.block.attn.fused_attn = enable

    def set_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
        self.precision = precision

    def grad_scaler(self, device_type: str = "cuda") -> torch.amp.GradScaler:
        """A loss scaler for training at this model's precision: active for fp16 only (fp32 and
        bf16 need none; a disabled scaler's ``scale``/``step``/``update`` are plain pass-throughs)."""
        return torch.amp.GradScaler(device_type, enabled=self.precision == "fp16")

    def _autocast(self, device_type: str):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device_type, dtype=dtype)

    # ---------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            n = len(vit.blocks) if self.checkpoint_blocks is None else self.checkpoint_blocks
            if n:
                x = checkpoint_seq(vit.blocks[:n], x, use_reentrant=False)
            x = vit.blocks[n:](x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast(x.device.type):
            return self.vit.forward_head(self.forward_features(x))

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier head receives (timm's ``forward_head(..., pre_logits=True)``):
        ``head_logits(pre_logits(x))`` is ``forward(x)``."""
        with self._autocast(x.device.type):
            return self.vit.forward_head(self.forward_features(x), pre_logits=True)

    def head_logits(self, f: torch.Tensor) -> torch.Tensor:
        """The classifier head on :meth:`pre_logits` features."""
        with self._autocast(f.device.type):
            return self.vit.get_classifier()(f)
