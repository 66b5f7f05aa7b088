"""The retraining methods as data (pure Python, no torch): one :class:`Method` per method the
``retrain`` stage can train, with the module widths of its fixed config, whether its backbone
trains and the recipe it defaults to.

Everything that names the methods reads :data:`METHODS`: the checks of ``retrain.method``,
``retrain.baselines`` and ``hpo.method_space`` (:mod:`noah_ray.run.preflight`), the configs the
methods train (:func:`noah_ray.nn.models.subnet_for`), the models (``train_backbone``), the CLI's
``--method`` help.  A new method is one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from noah_ray.space.kinds import ADAPTER, KV_PROMPT, LORA, VPT


@dataclass(frozen=True)
class Method:
    """One retraining method.  ``searched``: it trains the search's winner (NOAH), not a fixed config;
    else ``widths`` are its uniform per-layer module widths (none: only the head, and the backbone
    when ``trains_backbone``).  ``recipe``: the training recipe it uses unless ``model.recipe`` is set."""

    name: str
    widths: Mapping[str, int] = field(default_factory=dict)
    trains_backbone: bool = False
    searched: bool = False
    recipe: str = "noah"


#: every retraining method by name: NOAH's searched subnet, then the baselines (VPT-Deep 10 tokens,
#: Adapter 8, LoRA rank 8 on q, k, v, E2VPT 5 visual + 5 key/value prompts per layer)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("noah", searched=True),
    Method("linear"),                                   # the head only
    Method("full", trains_backbone=True),               # backbone + head
    Method("vpt", {VPT: 10}),
    Method("adapter", {ADAPTER: 8}),
    Method("lora", {LORA: 8}),
    Method("e2vpt", {VPT: 5, KV_PROMPT: 5}, recipe="e2vpt"),
)}


#: the NOAH row whose subnet the race chose (the service's default selection); the row ``noah`` is
#: the search's own choice retrained (the paper's procedure).  Both train method ``noah``.
RACED_NOAH = "noah+"
#: result rows named other than the method they train: row label -> method
ROW_METHODS: dict[str, str] = {RACED_NOAH: "noah"}


def method_of(label: str) -> str:
    """The retraining method a result row trains: ``noah`` for ``noah+``, else the label itself."""
    return ROW_METHODS.get(label, label)


def baselines() -> tuple[str, ...]:
    """The methods training a fixed config (all but the searched one), in registry order."""
    return tuple(name for name, m in METHODS.items() if not m.searched)


def baseline_widths() -> dict[str, dict[str, int]]:
    """Each baseline's uniform per-layer widths (``retrain.baseline_widths`` overrides them)."""
    return {name: dict(METHODS[name].widths) for name in baselines()}


def trains_backbone(method: str) -> bool:
    """Whether retraining ``method`` trains the backbone too (``full``); False for unknown names."""
    m = METHODS.get(method)
    return m is not None and m.trains_backbone


def default_recipe(method: str) -> str:
    """The recipe ``method`` trains with when ``model.recipe`` is unset (``noah`` for unknown names)."""
    m = METHODS.get(method)
    return m.recipe if m is not None else "noah"


def method_help() -> str:
    """The CLI's ``--method`` help: ``noah or a baseline: linear, full, ...``."""
    searched = [name for name, m in METHODS.items() if m.searched]
    return f"{' or '.join(searched)} or a baseline: {', '.join(baselines())}"
