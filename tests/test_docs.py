"""Every ``code`` name and path in docs/architecture.md exists, so the page cannot silently rot.

The page's inline code spans (fenced blocks are skipped) are classified by these rules, in order:

1. A trailing call is dropped: ``JobPaths.of(job)`` is checked as ``JobPaths.of``.
2. ``python -m MODULE ...``: ``MODULE`` must be importable (``importlib.util.find_spec``).
3. A span with a placeholder or any character outside ``[A-Za-z0-9_./*-]`` (spaces, ``<job>``,
   ``{...}``, ``[...]``, ``:``) is prose or a code snippet and is not checked.
4. A path (contains ``/``, or ends in ``.py`` / ``.md`` / ``.yaml`` / ``.yml`` / ``.toml`` / ``.json`` /
   ``.jsonl`` / ``.safetensors`` / ``.parquet``) must exist relative to the repo root or to
   ``noah_ray/`` (``*`` globs must match something).  A bare file name without ``/`` may instead be
   one a job writes: then the package source names it (in quotes or in the layout docstring), e.g.
   ``best_subnet.yaml``, ``meta.json``.
5. Other spans with a ``.`` (or ``-``) are dotted names: ``noah_ray.x.y``, ``module.name`` where
   ``module`` is a ``noah_ray`` module named by its trailing components (``layout.JobPaths``,
   ``store.layout.JobPaths``), ``Class.attribute`` where ``Class`` is defined in ``noah_ray``, or an
   installed third-party module (``timm.optim``).  They must resolve by import + ``getattr``.  A name
   that does not resolve may still be a job-config key (``search.param_limit``): a section field of
   :class:`~noah_ray.config.JobConfig`, followed through the section dataclasses.  Spans with ``-``
   but no ``.`` (``noah-ray``, ``e2vpt-pruned``) are command or run names and are not checked.
6. A bare identifier (``JobPaths``, ``resolve``) must be a ``noah_ray`` module or subpackage
   (``security``, ``store``), be defined somewhere in ``noah_ray`` (``def NAME``, ``class NAME``,
   or ``NAME =`` / ``NAME:`` at module or class level), or be a string value the package knows
   (``"NAME"`` in its source, e.g. the recipe name ``modern``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import typing
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "noah_ray"
PAGE = ROOT / "docs" / "architecture.md"
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".json", ".jsonl", ".safetensors", ".parquet")
SIMPLE = re.compile(r"[A-Za-z0-9_./*-]+")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def code_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks, in order, duplicates kept once."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)
    return list(dict.fromkeys(s.strip() for s in spans))


@cache
def _sources() -> dict[str, str]:
    return {str(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _modules() -> tuple[str, ...]:
    out = []
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return tuple(sorted(out))


def _defines(name: str) -> list[str]:
    """The modules whose source defines ``name`` at module or class level."""
    pat = re.compile(rf"^(?:\s*(?:async\s+)?def|\s*class)\s+{re.escape(name)}\b|^(?: {{4}})?{re.escape(name)}\s*[:=]",
                     re.M)
    mods = dict(zip((str(PACKAGE.parent / (m.replace(".", "/"))) for m in _modules()), _modules()))
    out = []
    for path, text in _sources().items():
        if pat.search(text):
            stem = path[:-len("/__init__.py")] if path.endswith("/__init__.py") else path[:-3]
            out.append(mods[stem])
    return out


def _known_string(name: str) -> bool:
    return any(f'"{name}"' in t or f"'{name}'" in t for t in _sources().values())


def _getattr_chain(obj: object, names: list[str]) -> bool:
    for i, n in enumerate(names):
        if n in getattr(obj, "__dataclass_fields__", {}) and i == len(names) - 1:
            return True                                            # a dataclass field without a default
        if not hasattr(obj, n):
            sub = f"{getattr(obj, '__name__', '')}.{n}"
            if not hasattr(obj, "__path__") or importlib.util.find_spec(sub) is None:   # a package's submodule
                return False
            obj = importlib.import_module(sub)
            continue
        obj = getattr(obj, n)
    return True


def _resolves(parts: list[str]) -> bool:
    tries: list[tuple[str, list[str]]] = []
    for mod in _modules():
        comps = mod.split(".")
        tries += [(mod, parts[k:]) for k in range(1, len(parts) + 1) if comps[-k:] == parts[:k]]
    tries += [(mod, parts) for mod in _defines(parts[0])]
    if not tries and importlib.util.find_spec(parts[0]) is not None:
        tries.append((parts[0], parts[1:]))
    return any(_getattr_chain(importlib.import_module(m), rest) for m, rest in tries)


def _config_key(parts: list[str]) -> bool:
    from noah_ray.config import JobConfig

    cls: object = JobConfig
    for name in parts:
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if name not in hints:
            return False
        hint = hints[name]
        cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
    return True


def _path_exists(span: str) -> bool:
    for base in (ROOT, PACKAGE):
        if any(base.glob(span.rstrip("/"))) if "*" in span else (base / span).exists():
            return True
    return "/" not in span and _known_string(span) or "/" not in span and span in _layout_doc()


@cache
def _layout_doc() -> str:
    return (PACKAGE / "store" / "layout.py").read_text().split('"""')[1]


def problem(span: str) -> str | None:
    """None when ``span`` names something that exists (or is not checked); else what is wrong."""
    span = re.sub(r"\(.*\)$", "", span)
    if span.startswith("python -m "):
        mod = span.split()[2]
        return None if importlib.util.find_spec(mod) else f"no module {mod}"
    if not SIMPLE.fullmatch(span) or span.strip(".-/") == "":
        return None
    if "/" in span or span.endswith(FILE_SUFFIXES):
        return None if _path_exists(span) else "no such file or folder"
    if "." in span:
        parts = span.split(".")
        if all(IDENT.fullmatch(p) for p in parts) and (_resolves(parts) or _config_key(parts)):
            return None
        return "does not resolve (import + getattr) and is no job-config key"
    if "-" in span or "*" in span:
        return None
    if any(m.rpartition(".")[2] == span for m in _modules()) or _defines(span) or _known_string(span):
        return None
    return "defined nowhere in noah_ray"


def test_every_code_name_and_path_on_the_architecture_page_exists():
    bad = [f"`{s}`: {why}" for s in code_spans(PAGE.read_text()) if (why := problem(s))]
    assert bad == []


@pytest.mark.parametrize("span, missing", [
    ("NoSuchThing_xyz", True), ("noah_ray.store.layout.NoSuchPaths", True), ("layout.no_such_function", True),
    ("noah_ray/no_such_module.py", True), ("search.no_such_key", True), ("python -m noah_ray.no_such", True),
    ("JobPaths", False), ("JobPaths.of(job)", False), ("store/layout.py", False), ("noah_ray.run.preflight.resolve", False),
    ("search.param_limit", False), ("<storage>/<job>/", False), ("python -m noah_ray.nn.pretrain", False),
])
def test_the_checker_reports_what_is_missing(span, missing):
    """A check that cannot fail is no check: made-up names and paths are reported."""
    assert (problem(span) is not None) == missing, problem(span)


def test_code_spans_skip_fenced_blocks():
    text = "a `x` b\n```\n`inside`\n```\n`y` and ``z``\n"
    assert code_spans(text) == ["x", "y"]
