"""The handlers of the interop subcommands of ``noah-ray``: ``import-noah``, ``export`` and
``import-peft`` (parsers in :mod:`noah_ray.cli`).  Imports (pyarrow, torch, peft) happen inside,
so ``noah-ray --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from noah_ray.errors import ConfigError


def import_noah_command(args: Any) -> int:
    """``noah-ray import-noah FILE... [--out DIR] [--num-classes N] [--model NAME] [--markdown]``.

    Bad files are reported one line each on stderr and skipped; the exit code is 2 if any was bad.
    """
    from noah_ray.interop.noah_import import DEFAULT_MODEL, NoahImport, format_import, import_noah, markdown_table
    from noah_ray.nn.backbones import shape_of
    from noah_ray.store import storage

    model_name = getattr(args, "model", None) or DEFAULT_MODEL
    shape = shape_of(model_name, 1)
    rows: list[NoahImport] = []
    failed = 0
    for f in args.files:
        try:
            rows.append(import_noah(f, num_classes=args.num_classes, model_name=model_name, shape=shape))
        except ConfigError as e:
            print(f"noah-ray: error: {e}", file=sys.stderr)
            failed += 1
    if getattr(args, "markdown", False):
        if rows:
            print(markdown_table(rows))
    else:
        for r in rows:
            print(format_import(r))
    if args.out and rows:
        out = storage.resolve(args.out, getattr(args, "endpoint", None))
        names: dict[str, str] = {}
        for r in rows:
            name = f"{r.dataset or Path(r.path).stem}.yaml"
            if name in names:
                name = f"{Path(r.path).stem}.yaml"
            if name in names:
                raise ConfigError(f"{r.path} and {names[name]} would both be written to {name}; "
                                  f"convert them in separate runs")
            names[name] = r.path
        for name, src in names.items():
            target = out.join(name)
            if not target.is_s3 and os.path.abspath(target.path) == os.path.abspath(src):
                raise ConfigError(f"--out would overwrite the source file {src}; choose another directory")
        for r, name in zip(rows, names):
            storage.write_text(out.join(name), r.subnet.to_yaml())
        print(f"wrote {len(rows)} subnet config(s) to {out.uri}", file=sys.stderr)
    return 1 if failed else 0


def export_command(args: Any) -> int:
    """``noah-ray export SOURCE [--run RUN] [--out URI] [--merge-lora] [--peft DIR]``."""
    from noah_ray.interop.artifact import load_subnet, model_from_run, read_artifact, save_subnet
    from noah_ray.interop.peft_export import export_peft

    if not args.out and not args.peft:
        raise ConfigError("nothing to do; give --out URI (subnet artifact) and/or --peft DIR (peft adapter)")
    src = args.source
    artifact = not src.endswith((".yaml", ".yml"))
    meta: dict = {}
    if not artifact:
        model, ckpt, model_name, endpoint = model_from_run(src, args.run)
        endpoint = args.endpoint or endpoint
    else:
        endpoint = args.endpoint
        _, meta = read_artifact(src, endpoint=endpoint)
        if args.peft and meta.get("merged_lora"):
            raise ConfigError(f"{src!r} has its LoRA merged into the qkv weights; export peft from the job run "
                              f"or an unmerged artifact")
        model = load_subnet(src, endpoint=endpoint)
        ckpt, model_name = meta.get("backbone_checkpoint"), meta["model_name"]
    if args.out:
        include = args.include_backbone or bool(meta.get("backbone_included"))
        loc = save_subnet(model, args.out, model_name=model_name, backbone_checkpoint=ckpt,
                          merge_lora=args.merge_lora, include_backbone=include, endpoint=endpoint)
        print(f"wrote subnet artifact to {loc.uri}" + (" (LoRA merged into qkv)" if args.merge_lora else ""))
    if args.peft:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = export_peft(model, args.peft, endpoint=endpoint, model_name=model_name)
        print(res.describe())
    sys.stdout.flush()
    return 0


def import_peft_command(args: Any) -> int:
    """``noah-ray import-peft DIR --out URI [--model NAME] [--backbone-checkpoint PATH] [--num-classes N]``."""
    from noah_ray.interop.artifact import save_subnet
    from noah_ray.interop.peft_import import import_peft
    from noah_ray.store import storage

    res = import_peft(args.folder, model_name=args.model, backbone_checkpoint=args.backbone_checkpoint,
                      num_classes=args.num_classes, endpoint=args.endpoint)
    print(res.describe())
    if args.out:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loc = save_subnet(res.model, args.out, model_name=res.model_name,
                              backbone_checkpoint=args.backbone_checkpoint, endpoint=args.endpoint)
        storage.write_text(loc.join("subnet.yaml"), f"# imported from the peft adapter {args.folder}\n"
                           + res.subnet.to_yaml())
        print(f"wrote subnet artifact + subnet.yaml to {loc.uri}\n"
              f"  evaluate: noah_ray.load_subnet({loc.uri!r})\n"
              f"  retrain:  --set retrain.subnet={loc.join('subnet.yaml').uri} --set retrain.init={loc.uri}")
    return 0
