"""peft -> noah_ray (noah_ray.interop.peft_import, ``noah-ray import-peft``), checked with real peft:
our export read back, adapters built with peft's own API (rank_pattern / alpha_pattern), one-line
refusals of what a subnet cannot hold, and retraining that starts from the imported weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from noah_ray import load_subnet
from noah_ray.cli.main import main
from noah_ray.errors import ConfigError
from noah_ray.interop.artifact import check_init_artifact, load_init_weights
from noah_ray.interop.peft_export import export_peft
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.supernet import PromptedViT
from noah_ray.run.preflight import resolve
from noah_ray.space import LORA, SubnetConfig

peft = pytest.importorskip("peft")
from noah_ray.interop.peft_import import import_peft  # noqa: E402  (needs peft)

TINY = "vit_noah_tiny_patch4_32"
LORA_ONLY = SubnetConfig({LORA: (4, 1, 8, 2, 0, 3, 0, 5, 1, 0, 6, 7)})


def randomise(module: torch.nn.Module, seed: int, only=lambda name: True) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and only(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(images())


def our_model(backbone_file: str, lora_scale: float = 0.5) -> PromptedViT:
    model = PromptedViT(create_backbone(TINY, 6, backbone_file), LORA_ONLY, lora_scale=lora_scale)
    randomise(model, 4)
    return model.eval()


def peft_adapter(folder: Path, backbone_file: str, **lora_kwargs):
    """A peft model made with peft's API on a stock timm ViT (random LoRA A and B), saved."""
    vit = create_backbone(TINY, 5, backbone_file)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["qkv"], "modules_to_save": ["head"],
                             **lora_kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(vit, cfg)
    randomise(pm, 9, lambda n: "lora_" in n or "head" in n)
    pm.save_pretrained(str(folder))
    return pm.eval()


def test_export_names_the_base_model_and_imports_to_identical_logits(tmp_path, backbone_file, capsys):
    model = our_model(backbone_file)
    export_peft(model, str(tmp_path / "peft"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == TINY                # the timm name (was null)
    res = import_peft(tmp_path / "peft", backbone_checkpoint=backbone_file)
    assert res.subnet == LORA_ONLY and res.model_name == TINY and res.num_classes == 6 and res.head
    assert res.lora_scale == 0.5 and res.ranks[11] == 7 and 4 not in res.ranks
    torch.testing.assert_close(logits(res.model), logits(model), rtol=0, atol=1e-6)
    # the command: artifact + subnet.yaml that load_subnet evaluates and retraining reads
    assert main(["import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "art"),
                 "--backbone-checkpoint", backbone_file]) == 0
    out = capsys.readouterr().out
    assert "ranks per layer 4 1 8 2 0 3 0 5 1 0 6 7" in out and "retrain.init=" in out
    assert SubnetConfig.load(tmp_path / "art" / "subnet.yaml") == LORA_ONLY
    torch.testing.assert_close(logits(load_subnet(str(tmp_path / "art"))), logits(model), rtol=0, atol=1e-6)


def test_adapter_made_with_peft_api_and_patterns_imports(tmp_path, backbone_file):
    rank_pattern = {"blocks.3.attn.qkv": 2, "blocks.11.attn.qkv": 6, "blocks.1.attn.qkv": 1}
    alpha_pattern = {"blocks.5.attn.qkv": 20, "blocks.1.attn.qkv": 3}
    pm = peft_adapter(tmp_path / "a", backbone_file, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    with pytest.raises(ConfigError, match="does not name its base model"):   # peft writes null for timm models
        import_peft(tmp_path / "a", backbone_checkpoint=backbone_file)
    res = import_peft(tmp_path / "a", model_name=TINY, backbone_checkpoint=backbone_file)
    want = [4] * 12
    want[3], want[11], want[1] = 2, 6, 1
    assert list(res.subnet.layer_widths(LORA)) == want
    assert res.alphas[5] == 20 and res.alphas[1] == 3 and res.alphas[0] == 8
    assert res.lora_scale == 2.0                                   # 8 / 4, the scale most layers have
    torch.testing.assert_close(logits(res.model), logits(pm), rtol=0, atol=1e-5)
    assert (logits(res.model) - logits(create_backbone(TINY, 5, backbone_file))).abs().max() > 1e-2


REFUSED = {
    "DoRA": ({"use_dora": True}, "DoRA"),
    "rsLoRA": ({"use_rslora": True}, "rsLoRA"),
    "another target": ({"target_modules": ["qkv", "fc1"]}, "LoRA on 'blocks.0.mlp.fc1'"),
    "bias training": ({"bias": "lora_only"}, "trains biases"),
    "another saved module": ({"modules_to_save": ["head", "norm"]}, "saves module 'norm'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unrepresentable_adapters_are_refused_in_one_line(case, tmp_path, backbone_file, capsys):
    kwargs, message = REFUSED[case]
    peft_adapter(tmp_path / "a", backbone_file, **kwargs)
    with pytest.raises(ConfigError, match=message) as e:
        import_peft(tmp_path / "a", model_name=TINY, backbone_checkpoint=backbone_file)
    assert "\n" not in str(e.value)
    rc = main(["import-peft", str(tmp_path / "a"), "--model", TINY, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and message.split("'")[0] in err
    assert not (tmp_path / "out").exists()


def test_init_weights_are_checked_against_the_job(tmp_path, backbone_file):
    model = our_model(backbone_file, lora_scale=0.5)
    export_peft(model, str(tmp_path / "peft"))
    assert main(["import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "art"),
                 "--backbone-checkpoint", backbone_file]) == 0
    check_init_artifact(str(tmp_path / "art"), model_name=TINY, subnet=LORA_ONLY, num_classes=6)
    for kwargs, what in (({"subnet": SubnetConfig.uniform(12, lora=2)}, "subnet"), ({"num_classes": 3}, "num_classes"),
                         ({"model_name": "vit_tiny_patch16_224"}, "model")):
        args = {"model_name": TINY, "subnet": LORA_ONLY, "num_classes": 6, **kwargs}
        with pytest.raises(ConfigError, match=f"has {what} "):
            check_init_artifact(str(tmp_path / "art"), **args)
    fresh = PromptedViT(create_backbone(TINY, 6, backbone_file), LORA_ONLY, lora_scale=1.0)   # another scale
    load_init_weights(fresh, str(tmp_path / "art"))
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=1e-6)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    save_file({k: v.contiguous() for k, v in create_backbone(TINY, 1).state_dict().items()
               if not k.startswith("head.")}, str(other))
    with pytest.raises(ConfigError, match="other backbone weights"):
        load_init_weights(PromptedViT(create_backbone(TINY, 6, str(other)), LORA_ONLY), str(tmp_path / "art"))


@pytest.mark.slow
def test_retraining_starts_from_the_imported_weights(ray_session, tmp_path, backbone_file, one_thread, tiny_job):
    """retrain.init: epoch 1 starts from the imported adapter (a 1e-9 learning rate keeps the
    weights where they started), its other-scale LoRA folded into B."""
    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.store import storage
    from noah_ray.train.runs import retrain

    write_generated_vtab(tmp_path / "data", "gen_color", num_train=16, num_val=8, num_test=8)
    model = PromptedViT(create_backbone(TINY, 4, backbone_file), LORA_ONLY, lora_scale=0.5)
    randomise(model, 4)
    export_peft(model, str(tmp_path / "peft"))
    assert main(["import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "art"),
                 "--backbone-checkpoint", backbone_file]) == 0
    job = JobConfig.from_dict(tiny_job(
        tmp_path / "data", tmp_path / "r", name="init", model={"checkpoint": backbone_file, "lora_scale": 1.0},
        space={"num_layers": 12, "modules": {"lora": {"widths": [1, 8]}}}, supernet=None, search=None,
        retrain={"epochs": 1, "lr": 1e-9, "min_lr": 0.0, "weight_decay": 0.0, "warmup_epochs": 0,
                 "max_failures": 0, "init": str(tmp_path / "art")}))
    res = retrain(resolve(job, ("retrain",)), SubnetConfig.load(tmp_path / "art" / "subnet.yaml"), method="noah")
    best, _ = storage.load_state(storage.resolve(res.metrics["checkpoint_uri"]))
    want = model.trainable_state_dict()
    assert best.keys() == want.keys()
    for k, v in want.items():       # scale 0.5 -> 1.0: B halves, the product B·A·scale is the same
        torch.testing.assert_close(best[k], v * 0.5 if k.endswith("lora_B") else v, rtol=0, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match="has subnet"):        # checked before Ray starts
        retrain(resolve(job, ("retrain",)), SubnetConfig.uniform(12, lora=1), method="noah")
