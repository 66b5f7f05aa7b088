"""The prompt-module protocol and its registry (like peft's tuner registry / timm's layer tables).

Every module kind (VPT, LoRA, Adapter, KV prompt) is one :class:`PromptModule` subclass,
registered with :func:`register` under its :mod:`noah_ray.space.kinds` name.  The class says,
in one place:

* its **width**: ``max_width`` (the capacity it was built with), ``active`` and
  :meth:`~PromptModule.set_width`; :meth:`~PromptModule.sliced_state` the weights of a smaller
  width (weight entanglement: the first ``w`` rows / columns);
* its **parameter count** for a width and backbone shape: :meth:`~PromptModule.count` reads the
  torch-free :data:`~noah_ray.space.kinds.SPECS` entry that :mod:`noah_ray.space` counts with;
* its **pruning gate** (prunable kinds: ``gated`` names the tensors a gate multiplies,
  ``token_axis`` their token axis): :meth:`~PromptModule.fix_gate`, :meth:`~PromptModule.folded`,
  :meth:`~PromptModule.take_tokens`;
* **where it attaches** in a block: :meth:`~PromptModule.build`, :meth:`~PromptModule.attach`
  (into a :class:`~noah_ray.nn.supernet.PromptBlock`), :meth:`~PromptModule.find` and
  :meth:`~PromptModule.detach` (from a plain timm block again).

:mod:`noah_ray.nn.supernet`, :mod:`noah_ray.nn.prune` and the artifact code loop over
:data:`REGISTRY` instead of branching per kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from torch import nn

from noah_ray.space.kinds import SPECS

if TYPE_CHECKING:
    from noah_ray.space.kinds import BackboneShape
    from noah_ray.space.recipes import Recipe

#: kind name -> class, filled by :func:`register` (in :data:`~noah_ray.space.kinds.MODULES` order
#: once :mod:`noah_ray.nn.modules` is imported)
REGISTRY: dict[str, type[PromptModule]] = {}

_Module = TypeVar("_Module", bound="PromptModule")


@dataclass(frozen=True)
class BuildContext:
    """What building a module needs to know besides its width."""

    shape: BackboneShape
    recipe: Recipe
    lora_scale: float = 1.0
    patch_area: int | None = None


def register(cls: type[PromptModule]) -> type[PromptModule]:
    """Class decorator: make ``cls`` the module of kind ``cls.kind``."""
    if cls.kind not in SPECS:
        raise ValueError(f"module kind {cls.kind!r} has no entry in module_specs.SPECS")
    REGISTRY[cls.kind] = cls
    return cls


class PromptModule(nn.Module):
    """Max-width weights of one prompt module of one layer, run at ``active`` width by slicing."""

    kind: ClassVar[str]
    label: ClassVar[str]                     # how errors name the width, e.g. "LoRA rank"
    gated: ClassVar[tuple[str, ...]] = ()    # tensors a pruning gate multiplies (prunable kinds)
    token_axis: ClassVar[int] = 0            # the token axis of those tensors

    max_width: int
    active: int
    gate: torch.Tensor | None                # the buffer _init_width registers (gated kinds)

    def _init_width(self, max_width: int) -> None:
        self.max_width = max_width
        self.active = max_width
        if self.gated:
            self.register_buffer("gate", None, persistent=False)

    # ----------------------------------------------------------------- width
    def set_width(self, width: int) -> None:
        if not 0 <= width <= self.max_width:
            raise ValueError(f"{self.label} {width} outside 0..{self.max_width}")
        self.active = width

    def sliced_state(self, width: int) -> dict[str, torch.Tensor]:
        """Copies of the weights a module of ``width`` holds (keys: this module's parameter names)."""
        raise NotImplementedError

    @classmethod
    def count(cls, width: int, shape: BackboneShape, kv_shared: bool = False) -> int:
        return SPECS[cls.kind].count(width, shape, kv_shared)

    # ------------------------------------------------------------ attachment
    @classmethod
    def build(cls, width: int, ctx: BuildContext) -> PromptModule:
        raise NotImplementedError

    @staticmethod
    def find(pblock: nn.Module) -> PromptModule | None:
        """This kind's module in a :class:`~noah_ray.nn.supernet.PromptBlock` (None: not attached)."""
        raise NotImplementedError

    @classmethod
    def attach(cls: type[_Module], pblock: nn.Module, module: _Module, recipe: Recipe) -> None:
        raise NotImplementedError

    @staticmethod
    def detach(block: nn.Module) -> None:
        """Restore a (copied) timm block to what it was before :meth:`attach`."""

    # ---------------------------------------------------------------- gates
    def gate_multiplier(self, gate: torch.Tensor) -> torch.Tensor:
        """``(n, segments)`` gate -> multiplier of the first ``n`` tokens of each gated tensor."""
        raise NotImplementedError

    def gated_params(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in self.gated if getattr(self, n) is not None}

    def folded(self) -> dict[str, torch.Tensor]:
        """The gated tensors (detached) with the fixed gate multiplied in (no gate: as they are)."""
        gate = getattr(self, "gate", None)
        out = {n: t.detach() for n, t in self.gated_params().items()}
        if gate is None:
            return out
        g = self.gate_multiplier(gate.detach()[: self.max_width])
        return {n: t * g.to(t.dtype) for n, t in out.items()}

    def fix_gate(self, gate: torch.Tensor) -> None:
        """Zero what ``gate`` (``(max_width, segments)`` 0/1) prunes and hold it there."""
        with torch.no_grad():
            g = self.gate_multiplier(gate)
            for t in self.gated_params().values():
                t.mul_(g.to(t.dtype))
        self.gate = gate

    def take_tokens(self, src: PromptModule, idx: torch.Tensor) -> None:
        """Copy tokens ``idx`` of ``src`` (same kind, larger) into this module's slots ``0..m-1``."""
        with torch.no_grad():
            for n, t in self.gated_params().items():
                t.copy_(getattr(src, n).index_select(self.token_axis, idx))
        self.gate = None


def modules_of(pblock: nn.Module) -> dict[str, PromptModule]:
    """The attached modules of a prompted block, by kind."""
    return {k: m for k, cls in REGISTRY.items() if (m := cls.find(pblock)) is not None}
