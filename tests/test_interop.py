"""Interop: original NOAH subnet files, inference artifacts (merged LoRA), peft export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from noah_ray import load_subnet, save_subnet
from noah_ray.cli.main import main
from noah_ray.config.datasets import get, names
from noah_ray.errors import ConfigError
from noah_ray.interop.noah_import import (
    dataset_from_filename,
    import_noah,
    read_noah_subnet,
    reference_files,
    reference_subnet,
)
from noah_ray.interop.peft_export import export_peft
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import ADAPTER, KV_PROMPT, LORA, VPT, SearchSpace, SubnetConfig

REF_FILES = reference_files()  # the original release's files, shipped in noah_ray/reference/
TINY = "vit_noah_tiny_patch4_32"

MIXED = SubnetConfig({VPT: (5, 1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                      LORA: (1, 5, 10, 5, 1, 10, 0, 0, 0, 0, 0, 0),
                      ADAPTER: (10, 1, 5, 10, 1, 5, 10, 1, 5, 0, 0, 0),
                      KV_PROMPT: (2, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0)})
# ranks differ between layers 1 and 11 (peft's rank_pattern keys must not be confused)
LORA_ONLY = SubnetConfig({LORA: (4, 1, 8, 2, 0, 3, 0, 5, 1, 0, 6, 7)})


# ------------------------------------------------------------------------ helpers
def make_model(cfg: SubnetConfig, ckpt: str, *, num_classes: int = 7, lora_scale: float = 0.5,
               seed: int = 0) -> PromptedViT:
    """A PromptedViT on the saved backbone with every trainable tensor randomised (LoRA B and
    adapter up start at zero, which would hide mistakes)."""
    vit = create_backbone(TINY, num_classes, ckpt)
    model = PromptedViT(vit, cfg, lora_scale=lora_scale)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(images())


# ------------------------------------------------------------------------ import
def test_all_19_reference_files_ship_and_resolve_by_dataset() -> None:
    assert len(REF_FILES) == 19
    assert {dataset_from_filename(p) for p in REF_FILES} == set(get(n).name for n in names("vtab"))
    assert reference_subnet("cifar") == read_noah_subnet(REF_FILES[1])  # folder-name variant
    with pytest.raises(ConfigError, match="no NOAH reference subnet for dataset 'mnist'; use one of caltech101"):
        reference_subnet("mnist")


@pytest.mark.parametrize("path", REF_FILES, ids=lambda p: p.stem.replace("ViT-B_prompt_", ""))
def test_reference_file_imports_validates_and_counts_exactly(path: Path) -> None:
    r = import_noah(path)
    SearchSpace().validate(r.subnet)
    assert r.space == "vtab"
    assert r.dataset is not None and r.num_classes == get(r.dataset).num_classes
    # the widths are the RETRAIN block's, not the stale SUPERNET ones
    retrain = yaml.safe_load(path.read_text())["RETRAIN"]
    assert list(r.subnet.widths[LORA]) == retrain["LORA_DIM"]
    assert list(r.subnet.widths[VPT]) == retrain["VISUAL_PROMPT_DIM"]
    # materialise on a stock ViT-B/16 (meta device: shapes only) and count what it holds
    with torch.device("meta"):
        model = PromptedViT(create_backbone("vit_base_patch16_224", r.num_classes), r.subnet)
    held = model.num_trainable()
    assert {m: held[m] for m in r.count.per_module} == r.count.per_module
    assert held["head"] == r.count.head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == r.count.total


def test_dataset_from_filename() -> None:
    assert dataset_from_filename("x/ViT-B_prompt_smallnorb_azi.yaml") == "smallnorb_azi"
    assert dataset_from_filename("ViT-B_prompt_oxford_flowers102.yaml") == "oxford_flowers102"
    assert dataset_from_filename("my_subnet.yaml") is None


def _noah_file(tmp_path: Path, name: str = "ViT-B_prompt_cifar100.yaml", **retrain) -> Path:
    body = {"PREFIX_DIM": [0] * 12, "VISUAL_PROMPT_DIM": [10] * 3 + [0] * 9,
            "LORA_DIM": [5] * 6 + [0] * 6, "ADAPTER_DIM": [1] * 12}
    body.update(retrain)
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"MODEL_NAME": "vit", "SUPERNET": {"LORA_DIM": 100}, "RETRAIN": body}))
    return p


@pytest.mark.parametrize("variant,needle", [
    ("no_retrain", "no RETRAIN block"),
    ("short_list", "lengths"),
    ("all_short", "11 per-layer widths"),
    ("non_integer", "1.5"),
    ("string_width", "'ten'"),
    ("prefix", "PREFIX_DIM"),
    ("missing_key", "ADAPTER_DIM"),
    ("not_yaml", "not valid YAML"),
    ("yaml_list", "no RETRAIN block"),
    ("unknown_dataset", "--num-classes"),
    ("scalar_prefix", "PREFIX_DIM"),
    ("binary", "UTF-8"),
])
def test_malformed_noah_files_give_one_line_errors(tmp_path: Path, capsys, variant: str, needle: str) -> None:
    name = "ViT-B_prompt_cifar100.yaml"
    if variant == "no_retrain":
        p = tmp_path / name
        p.write_text(yaml.safe_dump({"SUPERNET": {"LORA_DIM": 10}}))
    elif variant == "short_list":
        p = _noah_file(tmp_path, LORA_DIM=[5] * 11)
    elif variant == "all_short":
        p = _noah_file(tmp_path, PREFIX_DIM=[0] * 11, VISUAL_PROMPT_DIM=[1] * 11, LORA_DIM=[1] * 11,
                       ADAPTER_DIM=[1] * 11)
    elif variant == "non_integer":
        p = _noah_file(tmp_path, ADAPTER_DIM=[1.5] + [1] * 11)
    elif variant == "string_width":
        p = _noah_file(tmp_path, VISUAL_PROMPT_DIM=["ten"] + [1] * 11)
    elif variant == "prefix":
        p = _noah_file(tmp_path, PREFIX_DIM=[5] + [0] * 11)
    elif variant == "missing_key":
        p = tmp_path / name
        p.write_text(yaml.safe_dump({"RETRAIN": {"VISUAL_PROMPT_DIM": [1] * 12, "LORA_DIM": [1] * 12}}))
    elif variant == "not_yaml":
        p = tmp_path / name
        p.write_text("RETRAIN: [1, 2\n  LORA_DIM: {")
    elif variant == "yaml_list":
        p = tmp_path / name
        p.write_text("- 1\n- 2\n")
    elif variant == "scalar_prefix":
        p = _noah_file(tmp_path, PREFIX_DIM=5)
    elif variant == "binary":
        p = tmp_path / name
        p.write_bytes(b"\xff\xfe\x00RETRAIN\x00\x81")
    else:
        p = _noah_file(tmp_path, name="searched_subnet.yaml")
    with pytest.raises(ConfigError) as e:
        import_noah(p)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and p.name in msg
    # the CLI reports the same single line and exits 1
    assert main(["import-noah", str(p)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("noah-ray: error:") and needle in err and len(err.splitlines()) == 1


def test_cli_import_prints_counts_and_writes_configs(tmp_path: Path, capsys) -> None:
    good = _noah_file(tmp_path)
    bad = _noah_file(tmp_path, name="ViT-B_prompt_dtd.yaml", PREFIX_DIM=[1] * 12)
    out = tmp_path / "converted"
    assert main(["import-noah", str(good), str(bad), "--out", str(out)]) == 1  # one bad file -> exit 1
    cap = capsys.readouterr()
    r = import_noah(good)
    assert f"{r.count.total:,}" in cap.out and f"{r.count.head:,}" in cap.out and f"{r.count.modules:,}" in cap.out
    assert "cifar100 (100 classes)" in cap.out and "ViT-B_prompt_dtd.yaml" in cap.err
    assert SubnetConfig.load(out / "cifar100.yaml") == r.subnet       # the good file is converted
    assert not (out / "dtd.yaml").exists()
    # --num-classes overrides the head size from the file name
    assert main(["import-noah", str(good), "--num-classes", "3"]) == 0
    head_line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[0] == "head")
    assert head_line.split()[1] == f"{3 * 768 + 3:,}"


def test_cli_import_writes_to_s3(tmp_path: Path, s3_bucket, capsys) -> None:
    from noah_ray.store import storage

    endpoint, bucket = s3_bucket
    good = _noah_file(tmp_path)
    assert main(["import-noah", str(good), "--out", f"s3://{bucket}/subnets", "--endpoint", endpoint]) == 0
    text = storage.read_text(storage.resolve(f"s3://{bucket}/subnets/cifar100.yaml", endpoint))
    assert SubnetConfig.from_yaml(text) == import_noah(good).subnet


def test_cli_markdown_table_covers_all_reference_files(capsys) -> None:
    assert main(["import-noah", *map(str, REF_FILES), "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert all(line in readme.splitlines() for line in lines)  # the README's table is this output
    assert len(lines) == 2 + 19 + 1 and lines[0].startswith("| file |")
    cifar = next(line for line in lines if "cifar100" in line)
    assert f"{import_noah(REF_FILES[1]).count.total:,}" in cifar


# ------------------------------------------------------------------------ artifacts
def test_merged_lora_matches_unmerged_and_has_no_lora(tmp_path: Path, backbone_file: str) -> None:
    model = make_model(MIXED, backbone_file)
    save_subnet(model, str(tmp_path / "merged"), model_name=TINY, backbone_checkpoint=backbone_file, merge_lora=True)
    merged = load_subnet(str(tmp_path / "merged"))
    assert all(merged.module(LORA, i) is None for i in range(12))
    assert not any(merged.capacity.layer_widths(LORA))
    assert not any(".lora." in k for k in merged.state_dict())
    # the deltas really are in the qkv weights, and everything else is carried over
    base = create_backbone(TINY, 7, backbone_file)
    assert not torch.equal(merged.qkv_linear(0).weight, base.blocks[0].attn.qkv.weight)
    assert torch.equal(merged.qkv_linear(8).weight, base.blocks[8].attn.qkv.weight)
    for m in (VPT, ADAPTER, KV_PROMPT):
        assert merged.capacity.layer_widths(m) == MIXED.layer_widths(m)
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-5)
    # and it differs from the model without LoRA (so the test can fail)
    no_lora = load_subnet(str(tmp_path / "merged"), backbone_checkpoint=backbone_file)
    with torch.no_grad():
        for i in range(6):
            no_lora.qkv_linear(i).weight.copy_(base.blocks[i].attn.qkv.weight)
    assert (logits(no_lora) - logits(model)).abs().max() > 1e-3


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_load_round_trip(tmp_path: Path, backbone_file: str, where: str, request) -> None:
    model = make_model(MIXED, backbone_file, seed=1)
    endpoint = None
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/exports/cifar"
    else:
        uri = str(tmp_path / "artifact")
    loc = save_subnet(model, uri, model_name=TINY, backbone_checkpoint=backbone_file, endpoint=endpoint)
    loaded = load_subnet(uri, endpoint=endpoint)
    assert loaded.capacity == MIXED and loaded.lora_scale == 0.5 and not loaded.training
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)
    if where == "local":  # small: only the trainable tensors, no backbone
        size = Path(loc.path, "model.safetensors").stat().st_size
        n = sum(v.numel() for v in model.trainable_state_dict().values())
        assert size < 4 * n + 10_000
        meta = json.loads(Path(loc.path, "meta.json").read_text())
        assert meta["model_name"] == TINY and meta["num_classes"] == 7 and meta["merged_lora"] is False
        assert SubnetConfig.from_dict(meta["subnet"]) == MIXED and meta["backbone_checkpoint"] == backbone_file


def test_load_checks_the_backbone(tmp_path: Path, backbone_file: str) -> None:
    model = make_model(MIXED, backbone_file)
    with pytest.warns(UserWarning, match="backbone_checkpoint"):
        save_subnet(model, str(tmp_path / "a"), model_name=TINY)
    with pytest.raises(ConfigError, match="records no backbone checkpoint"):
        load_subnet(str(tmp_path / "a"))
    other = tmp_path / "other.safetensors"
    torch.manual_seed(99)
    save_file({k: v.contiguous() for k, v in create_backbone(TINY, 1).state_dict().items()
               if not k.startswith("head.")}, str(other))
    with pytest.raises(ConfigError, match="weights differ"):
        load_subnet(str(tmp_path / "a"), backbone_checkpoint=str(other))
    torch.testing.assert_close(logits(load_subnet(str(tmp_path / "a"), backbone_checkpoint=backbone_file)),
                               logits(model), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="not a subnet artifact"):
        load_subnet(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="model_name"):
        save_subnet(model, str(tmp_path / "b"), model_name="vit_base_patch16_224")


def test_save_takes_the_active_subnet_and_can_include_the_backbone(tmp_path: Path, backbone_file: str) -> None:
    space = SearchSpace.paper_vtab()
    supernet = make_model(space.largest(), backbone_file, seed=2)
    cfg = space.sample(__import__("random").Random(3))
    supernet.set_active(cfg)
    save_subnet(supernet, str(tmp_path / "sub"), model_name=TINY, include_backbone=True, merge_lora=True)
    loaded = load_subnet(str(tmp_path / "sub"))  # no checkpoint needed: the backbone is inside
    assert loaded.capacity.layer_widths(VPT) == cfg.layer_widths(VPT)
    torch.testing.assert_close(logits(loaded), logits(supernet), rtol=0, atol=1e-5)


def test_pruning_gates_are_folded_into_the_artifact(tmp_path: Path, backbone_file: str) -> None:
    model = make_model(MIXED, backbone_file, seed=5)
    g = torch.Generator().manual_seed(0)
    model.module(VPT, 0).gate = (torch.rand(5, 4, generator=g) > 0.5).float()
    model.module(KV_PROMPT, 2).gate = (torch.rand(3, 4, generator=g) > 0.5).float()
    gated = logits(model)
    save_subnet(model, str(tmp_path / "g"), model_name=TINY, backbone_checkpoint=backbone_file)
    loaded = load_subnet(str(tmp_path / "g"))
    assert loaded.module(VPT, 0).gate is None
    torch.testing.assert_close(logits(loaded), gated, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ peft
def test_export_peft_without_peft_is_one_clear_error(tmp_path: Path, backbone_file: str, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    with pytest.raises(ConfigError, match="peft is not installed"):
        export_peft(make_model(LORA_ONLY, backbone_file), str(tmp_path / "p"))


def test_peft_round_trip_lora_only(tmp_path: Path, backbone_file: str) -> None:
    peft = pytest.importorskip("peft")
    model = make_model(LORA_ONLY, backbone_file, seed=4)
    res = export_peft(model, str(tmp_path / "peft"))
    assert res.unsupported == {} and res.ranks["blocks.11.attn.qkv"] == 7 and res.ranks["blocks.1.attn.qkv"] == 1
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]["blocks.2.attn.qkv"] == 8 and cfg["alpha_pattern"]["blocks.2.attn.qkv"] == 4
    stock = create_backbone(TINY, 7, backbone_file)  # a plain timm ViT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(stock, str(tmp_path / "peft"))
    assert pm.base_model.model.blocks[11].attn.qkv.lora_A["default"].weight.shape == (7, 48)
    assert not hasattr(pm.base_model.model.blocks[4].attn.qkv, "lora_A")
    torch.testing.assert_close(logits(pm), logits(model), rtol=0, atol=1e-5)
    assert (logits(create_backbone(TINY, 7, backbone_file)) - logits(model)).abs().max() > 1e-3


def test_peft_export_names_what_it_cannot_represent(tmp_path: Path, backbone_file: str) -> None:
    pytest.importorskip("peft")
    model = make_model(MIXED, backbone_file)
    with pytest.warns(UserWarning, match="VPT prompts"):
        res = export_peft(model, str(tmp_path / "peft"))
    assert set(res.unsupported) == {VPT, ADAPTER, KV_PROMPT} and res.unsupported[VPT] == [0, 1, 2]
    assert "Adapter in layers 0,1,2,3,4,5,6,7,8" in res.describe()
    with pytest.raises(ConfigError, match="no LoRA"):
        export_peft(make_model(SubnetConfig.uniform(12, vpt=2), backbone_file), str(tmp_path / "none"))


# ------------------------------------------------------------------------ CLI export
def test_cli_export_from_artifact_and_job_run(tmp_path: Path, backbone_file: str, capsys) -> None:
    from noah_ray.store import storage

    model = make_model(MIXED, backbone_file, lora_scale=1.0)
    # a finished retrain run laid out as noah_ray.train.runs writes it
    job = {"name": "j", "storage": str(tmp_path / "res"), "model": {"name": TINY, "checkpoint": backbone_file}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    run = storage.resolve(str(tmp_path / "res")).join("j", "retrain", "noah-seed0")
    storage.save_state(run.join("best"), model.trainable_state_dict(), {"epoch": 3, "val_acc": 50.0})
    storage.save_state(run.join("final"), model.trainable_state_dict(),
                       {"num_classes": 7, "model": TINY, "backbone": backbone_file, "subnet": MIXED.to_json(),
                        "recipe": model.recipe.to_dict()})
    assert main(["export", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "art"), "--merge-lora",
                 "--peft", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "LoRA merged" in out and "peft cannot represent it): VPT prompts in layers 0,1,2" in out
    torch.testing.assert_close(logits(load_subnet(str(tmp_path / "art"))), logits(model), rtol=0, atol=1e-5)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    # an artifact re-exports; a merged one cannot give a peft adapter
    assert main(["export", str(tmp_path / "art"), "--out", str(tmp_path / "art2"), "--include-backbone"]) == 0
    again = load_subnet(str(tmp_path / "art2"), backbone_checkpoint="/nonexistent")  # backbone inside
    assert json.loads((tmp_path / "art2" / "meta.json").read_text())["merged_lora"] is True
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=1e-5)
    assert main(["export", str(tmp_path / "art"), "--out", str(tmp_path / "art3")]) == 0  # merged qkv kept
    torch.testing.assert_close(logits(load_subnet(str(tmp_path / "art3"))), logits(model), rtol=0, atol=1e-5)
    assert main(["export", str(tmp_path / "art"), "--peft", str(tmp_path / "p2")]) == 1
    assert "merged" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "job.yaml"), "--run", "noah-seed9", "--out", str(tmp_path / "x")]) == 1
    assert "no finished retrain run" in capsys.readouterr().err


def test_export_defaults_to_the_raced_run_when_the_job_raced(tmp_path: Path, backbone_file: str) -> None:
    """Without --run: ``noahplus-seed0`` (the race's survivor) when the job has it, else ``noah-seed0``."""
    from noah_ray.interop.artifact import model_from_run
    from noah_ray.store import storage

    job = {"name": "j", "storage": str(tmp_path / "res"), "model": {"name": TINY, "checkpoint": backbone_file}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    for run_id, cfg in (("noah-seed0", MIXED), ("noahplus-seed0", SubnetConfig.uniform(12, lora=2))):
        model = make_model(cfg, backbone_file, lora_scale=1.0)
        run = storage.resolve(str(tmp_path / "res")).join("j", "retrain", run_id)
        storage.save_state(run.join("best"), model.trainable_state_dict(), {"epoch": 3, "val_acc": 50.0})
        storage.save_state(run.join("final"), model.trainable_state_dict(),
                           {"num_classes": 7, "model": TINY, "backbone": backbone_file, "subnet": cfg.to_json(),
                            "recipe": model.recipe.to_dict()})
        got, *_ = model_from_run(str(tmp_path / "job.yaml"))
        assert got.active.key() == cfg.key()         # the plain run while it is alone, then the raced one


@pytest.mark.parametrize("run", ["../noah-seed0", "noah/seed0", ".hidden", ""])
def test_export_refuses_a_run_name_that_is_not_one_path_segment(tmp_path: Path, run: str) -> None:
    from noah_ray.interop.artifact import model_from_run

    with pytest.raises(ConfigError, match="must be one path segment"):
        model_from_run(str(tmp_path / "job.yaml"), run)       # before the job file is read
