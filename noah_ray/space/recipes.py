"""Recipes: named bundles of the settings where the original NOAH and E2VPT code differ from
today's common practice (pure Python, no torch).

Our modules' forward math equals the original code's; what differs is listed here, one field per
difference, so a job can train exactly as a paper did (``noah``, ``e2vpt``) or as a modern PEFT
library would (``modern``, this package's behaviour before recipes existed).  Every field can be
overridden on its own (``model:`` keys of the job config, or ``resolve(name, **overrides)``).

=================  ==================  ==================  ======================
setting            noah (default)      e2vpt               modern
=================  ==================  ==================  ======================
adapter_act        quick_gelu          gelu                gelu
lora_dropout       0.1                 0.0                 0.0
prompt_dropout     0.1                 0.0                 0.0
adapter_dropout    0.1                 0.0                 0.0
drop_path          before_adapter      after_adapter       after_adapter
vpt_init           xavier_tensor       vpt                 xavier_token
adapter_init       xavier              zero_up             zero_up
lora_init          kaiming             kaiming             kaiming
kv_init            kaiming             kaiming             xavier
kv_shared          True                True                False
prune_pieces       strided             strided             contiguous
prune_shared       True                True                False
prune_modules      vpt                 vpt                 vpt, kv_prompt
param_count        noah                exact               exact
=================  ==================  ==================  ======================

Meaning of the values (facts from the original code, see docs/recipes.md):

* ``quick_gelu``: ``x * sigmoid(1.702 x)`` (NOAH's adapter); ``gelu``: exact (erf) GELU.
* dropouts: on the LoRA input (``A @ drop(x)``), on the prompt tokens as inserted, on the
  adapter's hidden layer (after the activation); active only in training.
* ``before_adapter``: ``x + adapter(drop_path(mlp(norm2 x)))`` (NOAH); ``after_adapter``:
  ``x + drop_path(adapter(mlp(norm2 x)))`` (timm's block with the adapter inside ``mlp``).
* ``vpt_init``: ``xavier_tensor`` Xavier-uniform over the whole ``(1, max_tokens, dim)`` tensor,
  bound ``sqrt(6 / (max_tokens*dim + dim))``; ``vpt``: VPT / E2VPT ``sqrt(6 / (3*p*p + dim))``
  (``p`` the patch size); ``xavier_token``: ``sqrt(6 / (2*dim))``.
* ``adapter_init``: ``xavier`` down and up Xavier-uniform, biases N(0, 1e-6) (not the identity at
  start); ``zero_up``: down Xavier-uniform, up and biases zero (identity at start); ``vit``:
  weights truncated-normal std 0.02, biases zero.
* ``lora_init``: ``kaiming`` A Kaiming-uniform (a = sqrt 5), B zero; ``vit``: A and B
  truncated-normal std 0.02.
* ``kv_init``: ``kaiming`` E2VPT's Kaiming-uniform (a = 0, fan_in) over ``(heads, n, head_dim)``,
  bound ``sqrt(6 / (n * head_dim))``; ``xavier``: ``sqrt(6 / (2 * dim))``.
* ``kv_shared``: one tensor for keys and values (E2VPT's ``SHARE_PARAM_KV=True``).
* ``prune_pieces``: ``strided`` feature ``f`` belongs to piece ``f % num_segments`` (E2VPT);
  ``contiguous``: piece ``s`` is features ``s*dim/S .. (s+1)*dim/S - 1``.
* ``prune_shared``: one token mask and one piece mask for all layers (scores summed over layers).
* ``param_count``: ``exact`` counts what a subnet materialises; ``noah`` adds, when layer 0 has
  VPT tokens, NOAH's dead top-level prompt and its position embedding,
  ``(VPT[0] + max VPT) * dim`` (head excluded in both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from noah_ray.errors import ConfigError
from noah_ray.space.kinds import PRUNABLE_KINDS, VPT, BackboneShape
from noah_ray.space.subnet import SubnetConfig

#: allowed values of the string settings
CHOICES: dict[str, tuple[str, ...]] = {
    "adapter_act": ("quick_gelu", "gelu"),
    "drop_path": ("before_adapter", "after_adapter"),
    "vpt_init": ("xavier_tensor", "vpt", "xavier_token"),
    "adapter_init": ("xavier", "zero_up", "vit"),
    "lora_init": ("kaiming", "vit"),
    "kv_init": ("kaiming", "xavier"),
    "prune_pieces": ("strided", "contiguous"),
    "param_count": ("exact", "noah"),
}
DROPOUTS = ("lora_dropout", "prompt_dropout", "adapter_dropout")
PRUNE_MODULES = PRUNABLE_KINDS  # vpt, kv_prompt


@dataclass(frozen=True)
class Recipe:
    """One value per setting (see the module docstring for what each means)."""

    name: str = "noah"
    adapter_act: str = "quick_gelu"
    lora_dropout: float = 0.1
    prompt_dropout: float = 0.1
    adapter_dropout: float = 0.1
    drop_path: str = "before_adapter"
    vpt_init: str = "xavier_tensor"
    adapter_init: str = "xavier"
    lora_init: str = "kaiming"
    kv_init: str = "kaiming"
    kv_shared: bool = True
    prune_pieces: str = "strided"
    prune_shared: bool = True
    prune_modules: tuple[str, ...] = ("vpt",)
    param_count: str = "noah"

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}: {getattr(self, key)!r} unknown; use {' or '.join(allowed)}")
        for key in DROPOUTS:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"model.{key}: {v!r} must be a probability in [0, 1)")
        mods = tuple(self.prune_modules)
        if not mods or any(m not in PRUNE_MODULES for m in mods):
            raise ConfigError(f"model.prune_modules: {list(mods)} must name vpt and/or kv_prompt")
        object.__setattr__(self, "prune_modules", mods)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prune_modules"] = list(self.prune_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """A recipe recorded in ``meta.json`` (unknown keys rejected, missing ones from its name)."""
        data = dict(data)
        base = get(str(data.pop("name", "modern")))
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise ConfigError(f"recipe: unknown setting {bad[0]!r}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(base, **data)


RECIPES: dict[str, Recipe] = {
    "noah": Recipe(),
    "e2vpt": Recipe(name="e2vpt", adapter_act="gelu", lora_dropout=0.0, prompt_dropout=0.0, adapter_dropout=0.0,
                    drop_path="after_adapter", vpt_init="vpt", adapter_init="zero_up", param_count="exact"),
    "modern": Recipe(name="modern", adapter_act="gelu", lora_dropout=0.0, prompt_dropout=0.0, adapter_dropout=0.0,
                     drop_path="after_adapter", vpt_init="xavier_token", adapter_init="zero_up", kv_init="xavier",
                     kv_shared=False, prune_pieces="contiguous", prune_shared=False,
                     prune_modules=PRUNE_MODULES, param_count="exact"),
}
#: what a checkpoint written before recipes existed was trained with
LEGACY = "modern"
#: settings a job can override one by one (every field but the name)
SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "name")


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"model.recipe: {name!r} unknown; use {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve(name: str, **overrides: Any) -> Recipe:
    """Recipe ``name`` with the given settings replaced (``None`` values are ignored)."""
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"recipe: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    return dataclasses.replace(get(name), **{k: v for k, v in overrides.items() if v is not None})


def as_recipe(recipe: Recipe | str | None) -> Recipe:
    """A :class:`Recipe` from a recipe, a recipe name, or None (the default, ``noah``)."""
    if recipe is None:
        return RECIPES["noah"]
    return get(recipe) if isinstance(recipe, str) else recipe


def recorded(meta: Mapping[str, Any]) -> Recipe:
    """The recipe a ``meta.json`` records; one written before recipes existed is ``modern``."""
    data = meta.get("recipe")
    if data is None:
        return RECIPES[LEGACY]
    if isinstance(data, str):
        return get(data)
    return Recipe.from_dict(data)


# ------------------------------------------------------------------ parameter-count conventions
def noah_dead_params(cfg: SubnetConfig, shape: BackboneShape, max_vpt: int) -> int:
    """What NOAH's search counted beyond the materialised subnet: when layer 0 has VPT tokens,
    its top-level prompt (``VPT[0]`` tokens, replaced by block 0) and that prompt's position
    embedding (always ``max_vpt`` tokens wide); 0 otherwise."""
    first = cfg.layer_widths(VPT)[0] if cfg.num_layers else 0
    return (first + max_vpt) * shape.embed_dim if first > 0 else 0


def module_count(cfg: SubnetConfig, shape: BackboneShape, *, kv_shared: bool = False,
                 convention: str = "exact", max_vpt: int = 0) -> int:
    """Module parameters (head excluded) under ``convention`` (``exact`` or ``noah``)."""
    if convention not in CHOICES["param_count"]:
        raise ConfigError(f"param_count {convention!r} unknown; use exact or noah")
    exact = cfg.param_count(shape, kv_shared).modules
    return exact + (noah_dead_params(cfg, shape, max_vpt) if convention == "noah" else 0)
