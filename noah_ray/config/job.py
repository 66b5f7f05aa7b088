"""Job configuration: one schema (typed dataclasses) for the CLI, the Ray jobs and the tests.

A job config is a YAML or JSON file with the sections below; every section and key is
optional and defaults to the paper's settings.  Unknown keys and wrongly typed values are
rejected on load with one line naming the key and the fix.

.. code-block:: yaml

    name: cifar100-noah
    storage: s3://my-bucket/noah            # or a local directory / file:// URI
    data:   {root: /data/vtab-1k, dataset: cifar100}
    model:  {name: vit_base_patch16_224.augreg_in21k, checkpoint: /ckpt/ViT-B_16.npz}
    space:  {num_layers: 12, modules: {vpt: {depths: [3,6,9,12], widths: [1,5,10]}, ...}}
    supernet: {epochs: 500}
    search:   {generations: 20, param_limit: 0.64}
    retrain:  {epochs: 100, seeds: [0, 1, 2]}
    race:     {finalists: 8, baselines: true}   # the default; enabled: false retrains the search's winner
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from noah_ray.config.hpo import HpoConfig
from noah_ray.config.race import RaceConfig
from noah_ray.config.schema import (
    DataConfig,
    ModelConfig,
    PruneConfig,
    RetrainConfig,
    SearchConfig,
    SupernetConfig,
    hpo_is_int,
)
from noah_ray.config.sections import load_json, load_yaml, section_from_dict
from noah_ray.config.tracking import TrackingConfig
from noah_ray.errors import ConfigError
from noah_ray.security import safe_name
from noah_ray.space import SearchSpace, yaml_problem

#: the job's stages, in pipeline order: each reads the job section of its name and writes the stage
#: folder of its name (:mod:`noah_ray.store.layout`); ``race`` runs unless ``race.enabled: false``
#: (or ``retrain.subnet`` is given, or NOAH is not retrained), ``hpo`` only with an ``hpo`` section
STAGES: tuple[str, ...] = ("supernet", "search", "race", "hpo", "retrain")


@dataclass
class JobConfig:
    name: str = "noah"
    storage: str = "./noah-results"
    storage_endpoint: str | None = None   # S3 endpoint override (no credentials here, ever)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    space: SearchSpace = field(default_factory=SearchSpace)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    race: RaceConfig = field(default_factory=RaceConfig)   # finalist racing before retraining (noah_ray.hpo.race)
    prune: PruneConfig | None = None      # E2VPT pruning + rewinding after the e2vpt retraining
    hpo: HpoConfig | None = None          # hyper-parameter search before retraining (noah_ray.hpo)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)   # MLflow (noah_ray.store.tracking)

    # ------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "config") -> JobConfig:
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{where}: the top level must be a mapping of sections (name, storage, data, "
                              f"model, space, ...), got a {type(data).__name__}")
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown section {unknown[0]!r}; known: {', '.join(sorted(known))}")
        out = cls()
        for k in ("name", "storage", "storage_endpoint"):
            if k in data:
                if not (isinstance(data[k], str) or (k == "storage_endpoint" and data[k] is None)):
                    raise ConfigError(f"{where}.{k}: {data[k]!r} must be a string")
                setattr(out, k, data[k])
        if "data" in data:
            out.data = section_from_dict(DataConfig, data["data"], f"{where}.data")
        if "model" in data:
            out.model = section_from_dict(ModelConfig, data["model"], f"{where}.model")
        if "space" in data:
            out.space = SearchSpace.from_dict(data["space"], f"{where}.space")
        if "supernet" in data:
            out.supernet = SupernetConfig.from_dict(data["supernet"], f"{where}.supernet")
        if "search" in data:
            out.search = section_from_dict(SearchConfig, data["search"], f"{where}.search")
        if "retrain" in data:
            out.retrain = RetrainConfig.from_dict(data["retrain"], f"{where}.retrain")
        sup = data.get("supernet")
        out.supernet.resolve_epochs(out.retrain.epochs, isinstance(sup, Mapping) and sup.get("epochs") is not None,
                                    f"{where}.supernet")
        if "race" in data:
            out.race = section_from_dict(RaceConfig, data["race"] or {}, f"{where}.race")
            out.race.check_space(list(out.space.modules), f"{where}.race")
        if data.get("prune") is not None:
            out.prune = section_from_dict(PruneConfig, data["prune"], f"{where}.prune")
        if data.get("hpo") is not None:
            out.hpo = section_from_dict(HpoConfig, data["hpo"], f"{where}.hpo")
            out._check_hpo_bounds(f"{where}.hpo")
        if data.get("tracking") is not None:
            out.tracking = TrackingConfig.from_dict(data["tracking"], f"{where}.tracking")
        safe_name(out.name, f"{where}.name")
        return out

    @classmethod
    def load(cls, path: str | Path) -> JobConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; check the path")
        try:
            data = (load_json if p.suffix == ".json" else load_yaml)(p.read_text(), str(p))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: cannot parse ({str(e).splitlines()[0]}); fix the file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: cannot parse ({yaml_problem(e)}); fix the file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text (UTF-8) file; give a YAML or JSON job config") from None
        return cls.from_dict(data, where=str(p))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["space"] = self.space.to_dict()
        out["retrain"]["seeds"] = list(out["retrain"]["seeds"])
        out["retrain"]["baselines"] = list(out["retrain"]["baselines"])
        out["search"]["warm_start"] = list(out["search"]["warm_start"])
        out["search"]["warm_jobs"] = list(out["search"]["warm_jobs"])
        out["race"]["lrs"] = list(out["race"]["lrs"])
        if out["prune"] is not None and out["prune"]["modules"] is not None:
            out["prune"]["modules"] = list(out["prune"]["modules"])
        if out["hpo"] is None:
            del out["hpo"]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ------------------------------------------------------------ hyper-parameters
    def with_values(self, values: Mapping[str, float], method: str | None = None) -> JobConfig:
        """A copy with hyper-parameters set (config path -> value, as :class:`HpoConfig` names them);
        a tuned learning rate replaces ``retrain.method_lr[method]`` and lowers ``min_lr`` to it if
        needed.  The copy (without the ``hpo`` section) is validated like a loaded config."""
        data = self.to_dict()
        data.pop("hpo", None)
        for path, v in values.items():
            section, _, key = path.partition(".")
            data[section][key] = int(round(v)) if hpo_is_int(path) else float(v)
            if path == "retrain.lr":
                data["retrain"]["method_lr"].pop(method, None)
                data["retrain"]["min_lr"] = min(data["retrain"]["min_lr"], float(v))
        return JobConfig.from_dict(data, where="config (with tuned values)")

    def _check_hpo_bounds(self, where: str) -> None:
        """Both ends of every range give a valid job (``drop_path`` up to 1.5 is refused here)."""
        assert self.hpo is not None  # called once hpo is set
        for method in (None, *self.hpo.method_space):
            for path, p in self.hpo.params(method, where).items():
                for v in p.bounds():
                    try:
                        self.with_values({path: v}, method)
                    except ConfigError as e:
                        raise ConfigError(f"{where}: {path} = {v} is outside what the setting allows "
                                          f"({str(e).split(': ', 1)[-1]}); narrow the range") from None
