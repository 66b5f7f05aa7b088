"""Search space and subnet configurations (pure Python, no torch).

A :class:`SubnetConfig` gives, for every prompt module, one width per transformer layer
(0 = the module is absent in that layer).  A :class:`SearchSpace` says which widths and
depths are allowed, samples, mutates and crosses configs, and counts the exact number of
trainable parameters a materialised subnet holds.

Depth semantics (NOAH): a module of depth ``d`` lives in layers ``0 .. d-1``; each of those
layers picks its own width from the module's width choices.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from noah_ray.errors import ConfigError
from noah_ray.space.kinds import ADAPTER, KV_PROMPT, LORA, MODULES, SPECS, VPT, BackboneShape  # noqa: F401

#: the paper's VTAB-1k space
PAPER_DEPTHS: tuple[int, ...] = (3, 6, 9, 12)
PAPER_VTAB_WIDTHS: tuple[int, ...] = (1, 5, 10)
PAPER_FEWSHOT_WIDTHS: tuple[int, ...] = (5, 10, 50, 100)


def yaml_problem(e: Exception) -> str:
    """A YAML parse error in a few words: what and where (line, column)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _int_list(value: Any, key: str) -> tuple[int, ...]:
    """``value`` as a tuple of integers, else a :class:`ConfigError` naming ``key``."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in value):
        raise ConfigError(f"{key}: {value!r:.80} must be a list of integers, e.g. [1, 5, 10]")
    return tuple(value)


def _check_module(name: str) -> str:
    if name not in MODULES:
        raise ConfigError(f"unknown module {name!r}; use one of {', '.join(MODULES)}")
    return name


@dataclass(frozen=True)
class ModuleSpace:
    """Allowed depths and per-layer widths of one prompt module."""

    depths: tuple[int, ...] = PAPER_DEPTHS
    widths: tuple[int, ...] = PAPER_VTAB_WIDTHS

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(sorted(int(d) for d in self.depths)))
        object.__setattr__(self, "widths", tuple(sorted(int(w) for w in self.widths)))
        if not self.depths or any(d < 0 for d in self.depths):
            raise ConfigError(f"depths {self.depths} must be a non-empty list of integers >= 0")
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ConfigError(f"widths {self.widths} must be a non-empty list of integers > 0")

    @property
    def max_width(self) -> int:
        return self.widths[-1]


@dataclass(frozen=True)
class ParamCount:
    """Exact trainable-parameter count of a materialised subnet."""

    per_module: dict[str, int]
    head: int

    @property
    def modules(self) -> int:
        return sum(self.per_module.values())

    @property
    def total(self) -> int:
        return self.modules + self.head


def module_params(module: str, width: int, shape: BackboneShape, kv_shared: bool = False) -> int:
    """Parameters one module of ``width`` adds to one layer (0 when width is 0)."""
    spec = SPECS.get(module)
    if spec is None:
        raise ConfigError(f"unknown module {module!r}; use one of {', '.join(MODULES)}")
    return spec.count(width, shape, kv_shared)


@dataclass(frozen=True)
class SubnetConfig:
    """Per-module, per-layer widths of one subnet (0 = absent in that layer)."""

    widths: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        clean: dict[str, tuple[int, ...]] = {}
        lengths = set()
        for name, ws in self.widths.items():
            _check_module(name)
            if isinstance(ws, (str, bytes)) or not hasattr(ws, "__iter__"):
                raise ConfigError(f"widths of {name!r} must be a list of integers, got {ws!r}")
            values = tuple(ws)
            for i, w in enumerate(values):
                if not isinstance(w, int) or isinstance(w, bool) or w < 0:
                    raise ConfigError(
                        f"{name} layer {i}: width {w!r} must be an integer >= 0"
                    )
            clean[name] = values
            lengths.add(len(values))
        if len(lengths) > 1:
            raise ConfigError(
                f"all modules need one width per layer, got lengths "
                f"{ {k: len(v) for k, v in clean.items()} }"
            )
        # canonical order; drop nothing (an all-zero module is explicit and harmless)
        object.__setattr__(self, "widths", {m: clean[m] for m in MODULES if m in clean})

    # ----------------------------------------------------------------- views
    @property
    def num_layers(self) -> int:
        return len(next(iter(self.widths.values()))) if self.widths else 0

    def layer_widths(self, module: str) -> tuple[int, ...]:
        return self.widths.get(module, (0,) * self.num_layers)

    def depth(self, module: str) -> int:
        """Index of the last layer holding the module, plus one."""
        ws = self.layer_widths(module)
        return max((i + 1 for i, w in enumerate(ws) if w > 0), default=0)

    def active_modules(self) -> tuple[str, ...]:
        return tuple(m for m, ws in self.widths.items() if any(ws))

    def key(self) -> str:
        """Canonical string: equal configs have equal keys (used to never score twice)."""
        return json.dumps({m: list(ws) for m, ws in self.widths.items() if any(ws)},
                          sort_keys=True, separators=(",", ":"))

    def param_count(self, shape: BackboneShape, kv_shared: bool = False) -> ParamCount:
        per = {m: sum(module_params(m, w, shape, kv_shared) for w in ws)
               for m, ws in self.widths.items()}
        return ParamCount(per, shape.embed_dim * shape.num_classes + shape.num_classes)

    # -------------------------------------------------------------- builders
    @classmethod
    def empty(cls, num_layers: int = 12, modules: tuple[str, ...] = (VPT, LORA, ADAPTER)) -> SubnetConfig:
        return cls({m: (0,) * num_layers for m in modules})

    @classmethod
    def uniform(cls, num_layers: int = 12, **module_width: int) -> SubnetConfig:
        """The same width in every layer, e.g. ``uniform(12, vpt=10)`` (VPT-Deep baseline)."""
        return cls({m: (w,) * num_layers for m, w in module_width.items()})

    # ------------------------------------------------------------ round trip
    # One encoding everywhere: ``to_dict()`` ({module: [width per layer]}) is what subnet YAML
    # files, the ``subnet`` of ``meta.json`` / ``spec.json`` / artifacts and (as JSON text) the
    # Parquet ``config_json`` columns hold.  Older files are still read: YAML wrapped in a
    # ``widths:`` key (from_dict) and ``meta.json`` holding the JSON text (:meth:`decode`).
    def to_dict(self) -> dict[str, list[int]]:
        return {m: list(ws) for m, ws in self.widths.items()}

    @classmethod
    def decode(cls, value: Mapping[str, Any] | str) -> SubnetConfig:
        """A subnet as any file of ours records it: the :meth:`to_dict` mapping, or the JSON text
        of one (``meta.json`` before the encodings were unified, the Parquet columns)."""
        return cls.from_json(value) if isinstance(value, str) else cls.from_dict(value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubnetConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a subnet config must be a mapping of module -> widths, got {type(data).__name__}")
        body = data.get("widths", data)
        if not isinstance(body, Mapping):
            raise ConfigError("'widths' must map module names to lists of per-layer widths")
        return cls({str(k): tuple(v) if isinstance(v, list) else v for k, v in body.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> SubnetConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"subnet config is not valid JSON ({e}); fix the file") from None

    def to_yaml(self) -> str:
        text: str = yaml.safe_dump(self.to_dict(), default_flow_style=None, sort_keys=False)
        return text

    @classmethod
    def from_yaml(cls, text: str) -> SubnetConfig:
        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as e:
            raise ConfigError(f"subnet config is not valid YAML ({yaml_problem(e)}); fix the file") from None

    def save(self, path: str | Path) -> None:
        p = Path(path)
        text = self.to_json() if p.suffix == ".json" else self.to_yaml()
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> SubnetConfig:
        """A subnet config file: YAML, or JSON by its ``.json`` suffix.  Original NOAH subnet files
        (a ``RETRAIN`` block) are read by :func:`noah_ray.interop.read_subnet`, which dispatches."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"subnet config file {str(p)!r} does not exist; check the path")
        try:
            text = p.read_text()
            return cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text (UTF-8) file; give a subnet YAML / JSON file") from None
        except ConfigError as e:
            if str(p) in str(e):
                raise
            raise ConfigError(f"{p}: {e}") from None


@dataclass(frozen=True)
class SearchSpace:
    """Which modules, depths and per-layer widths a search may pick."""

    modules: Mapping[str, ModuleSpace] = field(
        default_factory=lambda: {m: ModuleSpace() for m in (VPT, LORA, ADAPTER)})
    num_layers: int = 12

    def __post_init__(self) -> None:
        if not self.modules:
            raise ConfigError("a search space needs at least one module")
        for m, s in self.modules.items():
            _check_module(m)
            if not isinstance(s, ModuleSpace):
                raise ConfigError(f"module {m!r}: expected a ModuleSpace, got {s!r}")
            bad = [d for d in s.depths if d > self.num_layers]
            if bad:
                raise ConfigError(f"module {m!r}: depth {bad[0]} exceeds the {self.num_layers} layers")
        object.__setattr__(self, "modules", {m: self.modules[m] for m in MODULES if m in self.modules})

    # ------------------------------------------------------------- factories
    @classmethod
    def paper_vtab(cls, num_layers: int = 12) -> SearchSpace:
        return cls(num_layers=num_layers)

    @classmethod
    def paper_fewshot(cls, num_layers: int = 12) -> SearchSpace:
        return cls({m: ModuleSpace(widths=PAPER_FEWSHOT_WIDTHS) for m in (VPT, LORA, ADAPTER)}, num_layers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "space") -> SearchSpace:
        if not isinstance(data, Mapping) or not isinstance(data.get("modules"), Mapping):
            raise ConfigError(f"{where}.modules: a search space needs 'modules': "
                              f"{{name: {{depths: [...], widths: [...]}}}}, got {data!r:.80}")
        unknown: list[str] | set[str]
        unknown = sorted(set(data) - {"modules", "num_layers"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: modules, num_layers")
        num_layers = data.get("num_layers", 12)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ConfigError(f"{where}.num_layers: {num_layers!r} must be an integer >= 1 (the backbone's blocks)")
        modules = {}
        for name, spec in data["modules"].items():
            _check_module(name)
            spec = {} if spec is None else spec
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{where}.modules.{name}: {spec!r:.80} must be a mapping {{depths: [...], "
                                  f"widths: [...]}}")
            unknown = set(spec) - {"depths", "widths"}
            if unknown:
                raise ConfigError(f"module {name!r}: unknown key(s) {sorted(unknown)}; use depths, widths")
            modules[name] = ModuleSpace(_int_list(spec.get("depths", PAPER_DEPTHS), f"{where}.modules.{name}.depths"),
                                        _int_list(spec.get("widths", PAPER_VTAB_WIDTHS),
                                                  f"{where}.modules.{name}.widths"))
        return cls(modules, num_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers,
                "modules": {m: {"depths": list(s.depths), "widths": list(s.widths)}
                            for m, s in self.modules.items()}}

    # ---------------------------------------------------------------- limits
    def max_widths(self) -> dict[str, int]:
        return {m: s.max_width for m, s in self.modules.items()}

    def largest(self) -> SubnetConfig:
        return SubnetConfig({m: (s.max_width,) * max(s.depths) + (0,) * (self.num_layers - max(s.depths))
                             for m, s in self.modules.items()})

    def smallest(self) -> SubnetConfig:
        return SubnetConfig({m: (s.widths[0],) * min(s.depths) + (0,) * (self.num_layers - min(s.depths))
                             for m, s in self.modules.items()})

    # ------------------------------------------------------------ validation
    def validate(self, cfg: SubnetConfig, absent_ok: bool = False) -> SubnetConfig:
        """Raise :class:`ConfigError` naming the offending module/layer/value, else return cfg.
        ``absent_ok``: a module may also be absent (depth 0) where the space's depths lack 0 (the
        supernet evaluates it with the module off; e.g. the warm-start configs of one module alone)."""
        if cfg.num_layers != self.num_layers:
            raise ConfigError(f"subnet has {cfg.num_layers} layers, the space has {self.num_layers}; "
                              f"give one width per layer")
        for m, ws in cfg.widths.items():
            if m not in self.modules:
                if any(ws):
                    raise ConfigError(f"module {m!r} is not in this search space "
                                      f"({', '.join(self.modules)}); remove it or add it to the space")
                continue
            s = self.modules[m]
            depth = cfg.depth(m)
            for i, w in enumerate(ws):
                if i < depth and w not in s.widths:
                    raise ConfigError(f"{m} layer {i}: width {w} is not in {list(s.widths)} "
                                      f"(modules fill layers 0..depth-1)")
            if depth not in s.depths and not (depth == 0 and (absent_ok or 0 in s.depths)):
                raise ConfigError(f"{m}: depth {depth} is not in {list(s.depths)}")
        for m in self.modules:
            if m not in cfg.widths and 0 not in self.modules[m].depths and not absent_ok:
                raise ConfigError(f"module {m!r} is missing from the subnet; give its per-layer widths")
        return cfg

    def contains(self, cfg: SubnetConfig, absent_ok: bool = False) -> bool:
        try:
            self.validate(cfg, absent_ok)
        except ConfigError:
            return False
        return True

    # ------------------------------------------------------ random operators
    def _module_widths(self, m: str, depth: int, rng: random.Random) -> tuple[int, ...]:
        s = self.modules[m]
        return tuple(rng.choice(s.widths) for _ in range(depth)) + (0,) * (self.num_layers - depth)

    def sample(self, rng: random.Random) -> SubnetConfig:
        """A random subnet: per module a depth, then a width per layer in 0..depth-1."""
        return SubnetConfig({m: self._module_widths(m, rng.choice(s.depths), rng)
                             for m, s in self.modules.items()})

    def mutate(self, cfg: SubnetConfig, rng: random.Random, prob: float = 0.2,
               depth_prob: float = 0.4) -> SubnetConfig:
        """Per module: with ``depth_prob`` re-sample the depth (kept layers keep their widths,
        new layers get random widths); then every active layer re-samples its width with ``prob``."""
        out: dict[str, tuple[int, ...]] = {}
        for m, s in self.modules.items():
            ws = list(cfg.layer_widths(m))
            depth = cfg.depth(m)
            if rng.random() < depth_prob:
                new_depth = rng.choice(s.depths)
                ws = [ws[i] if i < min(depth, new_depth) else
                      (rng.choice(s.widths) if i < new_depth else 0) for i in range(self.num_layers)]
                depth = new_depth
            for i in range(depth):
                if rng.random() < prob:
                    ws[i] = rng.choice(s.widths)
            out[m] = tuple(ws)
        return SubnetConfig(out)

    def crossover(self, a: SubnetConfig, b: SubnetConfig, rng: random.Random,
                  layer_prob: float = 0.5) -> SubnetConfig:
        """Child takes each module's depth from one parent, and each active layer's width from
        either parent (the other parent's width where it is active there, else a fresh draw)."""
        out: dict[str, tuple[int, ...]] = {}
        for m, s in self.modules.items():
            wa, wb = a.layer_widths(m), b.layer_widths(m)
            depth = a.depth(m) if rng.random() < 0.5 else b.depth(m)
            ws = []
            for i in range(self.num_layers):
                if i >= depth:
                    ws.append(0)
                    continue
                pick = [w for w in (wa[i], wb[i]) if w > 0]
                if not pick:
                    ws.append(rng.choice(s.widths))
                elif len(pick) == 1:
                    ws.append(pick[0])
                else:
                    ws.append(pick[0] if rng.random() < layer_prob else pick[1])
            out[m] = tuple(ws)
        return SubnetConfig(out)

    def size(self) -> int:
        """Number of distinct subnets in the space."""
        total = 1
        for s in self.modules.values():
            total *= sum(len(s.widths) ** d for d in s.depths)
        return total
