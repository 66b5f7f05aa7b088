"""The run records: typed ``spec.json`` (:class:`SpecRecord`), ``final/meta.json``
(:class:`MetaRecord`) and ``best/meta.json`` (:class:`BestRecord`) of a supernet or retraining run.

Writers build a record and store :meth:`to_dict`; readers go through :meth:`from_dict`, never
through string keys.  Each file carries ``schema_version`` (:data:`VERSION_KEY`); the current
versions are :data:`SPEC_VERSION` and :data:`META_VERSION`.

Compatibility policy
--------------------
* A file without ``schema_version`` is version 0: what noah_ray wrote before the records existed.
  It is read with the fallbacks the code applied then, and the reader of each older shape lives in
  the ``from_dict`` of the record it reads (nowhere else):

  - ``spec.json`` without ``recipe`` (before recipes): the ``legacy`` recipe; a supernet's without
    ``sampling`` (before sampling rules): ``uniform``.
  - ``final/meta.json`` without ``recipe``: the ``legacy`` recipe (a recipe name: that recipe);
    without ``backbone_trained``: from its ``method`` (``full``), else unknown (the run name decides,
    :meth:`MetaRecord.trains_backbone`); ``subnet`` as JSON text (before the encodings were unified)
    or as the ``to_dict`` mapping; without ``epochs_done``: 0; without ``val_acc``: none.
  - ``best/meta.json`` without ``recipe``: the ``legacy`` recipe.

* A version newer than this code knows is refused with one line (update noah_ray).
* The run fingerprint hashes :meth:`SpecRecord.content`: the spec without ``schema_version``, the
  same keys and values as before the records existed, so existing runs keep their fingerprints
  (and their ``retrain/<run>/<fp>/`` directories).
* The nested values of a spec (``recipe``, ``space``, ``subnet``, ``data``, ``prune_plan``,
  ``hpo``) stay the JSON they were recorded as: a spec is compared and hashed exactly, so reading
  must not normalise them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from noah_ray.errors import ConfigError
from noah_ray.space import SubnetConfig
from noah_ray.space.methods import METHODS, trains_backbone
from noah_ray.space.recipes import LEGACY, RECIPES, Recipe, recorded

Json = dict[str, Any]

VERSION_KEY = "schema_version"
SPEC_VERSION = 1
META_VERSION = 1


def _version(data: Mapping[str, Any], known: int, what: str) -> int:
    """The record's version (0: written before versions); a newer one is refused."""
    version = data.get(VERSION_KEY, 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= known:
        raise ConfigError(f"{what} has {VERSION_KEY} {version!r}, this noah_ray reads up to {known}; "
                          f"update noah_ray to read it")
    return version


def _mapping(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a JSON object, got {type(data).__name__}; write it again")
    return data


# ----------------------------------------------------------------------------- spec.json
@dataclass(frozen=True)
class SpecRecord:
    """What defines a run (``<run>/spec.json``): its checkpoints are only valid for this.

    The last four fields are recorded only when set (``sampling``: supernets; ``init``:
    ``retrain.init``; ``prune_plan``: the e2vpt-pruned run; ``hpo``: a tuned run), so that the
    fingerprints of runs without them stay as they were."""

    stage: str
    method: str
    model: str
    checkpoint: str | None
    drop_path_rate: float
    lora_scale: float
    kv_shared: bool
    recipe: Json
    space: Json | None
    subnet: Json | None
    num_classes: int
    data: Json
    lr: float
    weight_decay: float
    warmup_epochs: float
    min_lr: float
    seed: int
    sampling: str | None = None
    init: str | None = None
    prune_plan: Json | None = None
    hpo: Json | None = None

    #: recorded only when set
    OPTIONAL = ("sampling", "init", "prune_plan", "hpo")

    def content(self) -> Json:
        """The spec as hashed and compared: every field, the optional ones only when set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self.OPTIONAL or getattr(self, f.name)}

    def to_dict(self) -> Json:
        """``spec.json``: :meth:`content` plus the schema version."""
        return {**self.content(), VERSION_KEY: SPEC_VERSION}

    def fingerprint(self) -> str:
        """The run's fingerprint (its ``retrain/<run>/<fp>/`` directory): a hash of :meth:`content`."""
        return hashlib.sha1(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()[:10]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpecRecord:
        """A ``spec.json`` of any version up to :data:`SPEC_VERSION` (older shapes: module docstring)."""
        data = _mapping(data, "spec.json")
        _version(data, SPEC_VERSION, "spec.json")
        values = {k: v for k, v in data.items() if k != VERSION_KEY}
        values.setdefault("recipe", RECIPES[LEGACY].to_dict())          # a run from before recipes existed
        if values.get("stage") == "supernet":
            values.setdefault("sampling", "uniform")                     # a supernet from before sampling rules
        names = [f.name for f in dataclasses.fields(cls)]
        missing = next((n for n in names if n not in values and n not in cls.OPTIONAL), None)
        if missing is not None:
            raise ConfigError(f"spec.json has no {missing!r}; it is not a run spec of noah_ray, remove the run "
                              f"directory or use another run_name or job name")
        fields: dict[str, Any] = {n: values.get(n) for n in names}
        return cls(**fields)


# ----------------------------------------------------------------------------- final/meta.json
@dataclass(frozen=True)
class MetaRecord:
    """``<run>/final/meta.json``: what was trained, for how long, and its parameter counts.

    A supernet's also records its ``space``; a retraining's its test accuracy and best epoch
    (``test_acc``, ``best_val``, ``best_epoch`` counted from 0, ``best_uri``); an e2vpt-pruned
    run's its ``prune_plan`` (``params``: the parameters that can be non-zero,
    ``params_materialised``: all of them); a tuned run's its ``hpo``."""

    stage: str | None = None
    run_id: str | None = None
    epochs_done: int = 0
    num_classes: int | None = None
    model: str | None = None
    backbone: str | None = None
    spec: Json | None = None                    # the run's SpecRecord.content()
    seed: int | None = None
    subnet: SubnetConfig | None = None
    method: str | None = None
    backbone_trained: bool | None = None        # None: not recorded (the run name tells)
    train_time_s: float = 0.0
    fingerprint: str | None = None
    start_epochs: list[int] = field(default_factory=list)
    val_acc: dict[str, float] = field(default_factory=dict)
    params_head: int | None = None
    recipe: Recipe = field(default_factory=lambda: RECIPES[LEGACY])
    params: int | None = None
    hpo: Json | None = None
    prune_plan: Json | None = None
    params_materialised: int | None = None
    space: Json | None = None
    test_acc: float | None = None
    best_val: float | None = None
    best_epoch: int | None = None
    best_uri: str | None = None

    #: recorded only when set
    OPTIONAL = ("hpo", "prune_plan", "params_materialised", "space", "test_acc", "best_val", "best_epoch",
                "best_uri")

    def trains_backbone(self, run_id: str) -> bool:
        """Whether the run trained the backbone (method ``full``); files from before either key
        was recorded: from the run name (``full-seed<k>``)."""
        if self.backbone_trained is not None:
            return self.backbone_trained
        return any(run_id.startswith(f"{name}-") for name, m in METHODS.items() if m.trains_backbone)

    def to_dict(self) -> Json:
        out: Json = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.OPTIONAL and value is None:
                continue
            out[f.name] = value
        out["epochs"] = self.epochs_done            # the same number, under its older name too
        out["subnet"] = self.subnet.to_dict() if self.subnet is not None else None
        out["recipe"] = self.recipe.to_dict()
        out["start_epochs"], out["val_acc"] = list(self.start_epochs), dict(self.val_acc)
        out[VERSION_KEY] = META_VERSION
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetaRecord:
        """A ``final/meta.json`` of any version up to :data:`META_VERSION` (older shapes: module docstring)."""
        data = _mapping(data, "meta.json")
        _version(data, META_VERSION, "meta.json")
        names = {f.name for f in dataclasses.fields(cls)} - {"subnet", "recipe", "backbone_trained", "val_acc"}
        values: dict[str, Any] = {k: data[k] for k in names if data.get(k) is not None}
        subnet, trained, val = data.get("subnet"), data.get("backbone_trained"), data.get("val_acc")
        if trained is None and data.get("method") is not None:    # before backbone_trained was recorded
            trained = trains_backbone(data["method"])
        return cls(**values, subnet=SubnetConfig.decode(subnet) if subnet else None, recipe=recorded(data),
                   backbone_trained=None if trained is None else bool(trained),
                   val_acc=dict(val) if isinstance(val, Mapping) else {})


# ----------------------------------------------------------------------------- best/meta.json
@dataclass(frozen=True)
class BestRecord:
    """``<run>/best/meta.json`` of a retraining: the epoch (from 0) of the best-on-val weights."""

    epoch: int
    val_acc: float
    recipe: Recipe = field(default_factory=lambda: RECIPES[LEGACY])

    def to_dict(self) -> Json:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "recipe": self.recipe.to_dict(),
                VERSION_KEY: META_VERSION}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BestRecord:
        data = _mapping(data, "best/meta.json")
        _version(data, META_VERSION, "best/meta.json")
        try:
            return cls(int(data["epoch"]), float(data["val_acc"]), recorded(data))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"best/meta.json is malformed ({e!r}); delete the run's best/ and train it again") \
                from None
