"""E2VPT pruning: removed tokens are really gone and equal a masked-attention reference,
scores are mask gradients, plans map to SubnetConfigs, pruned segments stay zero, rewinding.

Reference choice: a zeroed prompt token is NOT a removed one (a zero key still gets softmax
weight, a zero VPT token still gets a value from LayerNorm biases), so the pruned model is
compared with ``masked_forward`` below: the *unpruned* model run block by block with explicit
attention where every pruned token is excluded as a key by an additive ``-inf`` bias (its own
output row is discarded anyway: VPT tokens are replaced or stripped later).
"""

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from noah_ray.errors import ConfigError
from noah_ray.nn import prune as P
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.modules import PromptAttention
from noah_ray.nn.modules.vpt import expand_gate
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SubnetConfig

MODEL = "vit_noah_tiny_patch4_32"
# recipe "modern": our pruning extension (contiguous segments, per-layer masks, KV prompts too);
# E2VPT's own layout (recipes noah / e2vpt) is tested in test_recipes.py
CFG = SubnetConfig({"vpt": [6, 0, 4, 8, 0, 2, 5, 0, 0, 1, 0, 3],
                    "kv_prompt": [4, 0, 3, 5, 2, 0, 1, 0, 2, 0, 0, 6],
                    "lora": [2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0]})


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process torch on one thread (conftest)


def _model(shared: bool = False, seed: int = 0) -> PromptedViT:
    torch.manual_seed(seed)
    net = PromptedViT(create_backbone(MODEL, 5), CFG, kv_shared=shared, recipe="modern").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _batches(n: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _random_plan(net: PromptedViT, seed: int, segments: int = 0) -> P.PrunePlan:
    """Random token scores -> plan; optionally random segment masks on top."""
    g = torch.Generator().manual_seed(seed)
    scores = {(m, i): torch.rand(w, 1, generator=g) for m in P.PRUNABLE
              for i, w in enumerate(net.active.layer_widths(m)) if w}
    plan = P.plan_tokens(scores, net.active, 0.5)
    if segments:
        seg = {(m, i): torch.rand(len(k), segments, generator=g)
               for m, layers in plan.kept.items() for i, k in enumerate(layers) if k}
        plan = P.plan_segments(plan, seg, 0.4, segments)
    return plan


# ------------------------------------------------------------------ masked reference
def _attention(attn, x, key_alive):
    kvp = attn.kv_prompt if isinstance(attn, PromptAttention) else None
    a, (B, N, _) = (attn.attn if kvp is not None else attn), x.shape
    lora = getattr(a.qkv, "lora", None)
    qkv = getattr(a.qkv, "base", a.qkv)(x)
    if lora is not None and lora.active > 0:
        qkv = qkv + lora.delta(x)
    q, k, v = qkv.reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    if kvp is not None and kvp.active > 0:
        k, v = kvp.extend(k, v)
    bias = torch.zeros(k.shape[2]).masked_fill(~key_alive, float("-inf"))
    w = ((q * a.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
    return a.proj((w @ v).transpose(1, 2).reshape(B, N, -1))


def masked_forward(net: PromptedViT, x: torch.Tensor, plan: P.PrunePlan) -> torch.Tensor:
    """Unpruned ``net`` (segments zeroed as in the plan) with pruned tokens masked out."""
    net = copy.deepcopy(net)
    alive = {}
    with torch.no_grad():
        for m, layers in plan.kept.items():
            for i, w in enumerate(plan.base.layer_widths(m)):
                keep = torch.zeros(w, dtype=torch.bool)
                keep[list(layers[i])] = True
                alive[(m, i)] = keep
                mask = plan.masks(m, i)
                if mask is not None:  # zero the pruned segments of kept tokens
                    full = torch.ones(w, plan.num_segments)
                    full[list(layers[i])] = mask
                    net.module(m, i).fix_gate(full)
                    net.module(m, i).gate = None
    vit, npre = net.vit, net.vit.num_prefix_tokens
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    prompt_alive = torch.zeros(0, dtype=torch.bool)
    for i, pb in enumerate(vit.blocks):
        if pb.vpt is not None and pb.vpt.active > 0:
            h = pb.vpt.insert(h, npre, pb.num_in)
            prompt_alive = alive[("vpt", i)]
        n_patch = h.shape[1] - npre - len(prompt_alive)
        key_alive = torch.cat([torch.ones(npre, dtype=torch.bool), prompt_alive,
                               torch.ones(n_patch, dtype=torch.bool)])
        if ("kv_prompt", i) in alive:
            key_alive = torch.cat([alive[("kv_prompt", i)], key_alive])
        blk = pb.block
        h = h + blk.ls1(_attention(blk.attn, blk.norm1(h), key_alive))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    h = torch.cat([h[:, :npre], h[:, npre + len(prompt_alive):]], dim=1)
    return vit.forward_head(vit.norm(h))


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shared,fused,segments", [(False, True, 0), (False, False, 8), (True, True, 8)])
def test_removed_tokens_equal_masked_attention_reference(shared, fused, segments):
    net = _model(shared)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    for seed in range(2):
        plan = _random_plan(net, seed, segments)
        if seed == 1:  # a layer whose KV prompts are all gone
            kv = list(plan.kept["kv_prompt"])
            kv[4] = ()
            masks = {m: tuple(() if (m, i) == ("kv_prompt", 4) else r for i, r in enumerate(rows))
                     for m, rows in plan.segment_masks.items()}
            plan = replace(plan, kept={**plan.kept, "kv_prompt": tuple(kv)}, segment_masks=masks)
        pruned = P.apply_plan(net, plan).eval()
        pruned.set_fused_attn(fused)
        with torch.no_grad():
            ref, out = masked_forward(net, x, plan), pruned(x)
            zeroed = _zero_gated(net, plan)(x)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (seed, (out - ref).abs().max())
        # zeroing instead of removing is a different network: the test can tell them apart
        assert not torch.allclose(zeroed, ref, atol=1e-3)


def _zero_gated(net, plan):
    z = copy.deepcopy(net)
    for m, layers in plan.kept.items():
        for i, w in enumerate(plan.base.layer_widths(m)):
            if w:
                g = torch.zeros(w, 1)
                g[list(layers[i])] = 1
                z.module(m, i).gate = g
    return z


def test_pruned_model_is_smaller_in_sequence_keys_and_params():
    net = _model()
    plan = _random_plan(net, 0)
    pruned = P.apply_plan(net, plan)
    lens = {}
    hooks = [pb.register_forward_hook(lambda mod, inp, out, i=i: lens.update({i: inp[0].shape[1]}))
             for i, pb in enumerate(pruned.vit.blocks)]
    pruned(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    cfg = plan.config()
    assert cfg.layer_widths("vpt")[0] == len(plan.kept["vpt"][0]) < CFG.layer_widths("vpt")[0]
    assert lens[0] == 1 + 64 and lens[1] == 1 + 64 + cfg.layer_widths("vpt")[0]
    assert lens[3] == 1 + 64 + cfg.layer_widths("vpt")[2] < 1 + 64 + 4
    assert pruned.module("kv_prompt", 3).key.shape[1] == len(plan.kept["kv_prompt"][3]) < 5
    count = cfg.param_count(pruned.shape)
    got = pruned.num_trainable()
    assert {m: got[m] for m in count.per_module} == count.per_module
    assert count.modules < CFG.param_count(net.shape).modules
    # the net itself is untouched and still runs its own config
    assert net.active == CFG and net.module("vpt", 0).prompts.shape[0] == 6


def test_pruned_state_dict_extract_and_reload():
    net = _model()
    plan = _random_plan(net, 1, segments=4)
    pruned = P.apply_plan(net, plan).eval()
    x = torch.randn(2, 3, 32, 32)
    fresh = PromptedViT(create_backbone(MODEL, 5), plan.config(), recipe="modern")
    fresh.vit.load_state_dict(pruned.vit.state_dict())
    fresh.eval()
    with torch.no_grad():
        y = pruned(x)
        assert torch.allclose(pruned.extract(plan.config()).eval()(x), y, atol=1e-6)
        assert torch.allclose(fresh(x), y, atol=1e-6)  # zeroed segments survive a reload
    restored = P.PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan


def test_scores_are_mask_gradients():
    """Token score = -dL/dgate = -sum(prompt * dL/dprompt) (signed), |.| per batch (abs)."""
    net = _model()
    batches = _batches(2)
    signed = P.mask_scores(net, batches, score="signed")
    absolute = P.mask_scores(net, batches, score="abs")
    seg = P.mask_scores(net, batches, score="signed", num_segments=4)
    assert all(p.grad is None for p in net.parameters())  # only the gates got gradients
    per_batch = []
    for x, y in batches:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        per_batch.append({"vpt": -(net.module("vpt", 3).prompts * net.module("vpt", 3).prompts.grad),
                          "kv": -(net.module("kv_prompt", 3).key * net.module("kv_prompt", 3).key.grad
                                  + net.module("kv_prompt", 3).value * net.module("kv_prompt", 3).value.grad)})
    vpt_tok = torch.stack([b["vpt"].sum(-1) for b in per_batch])           # (batches, 8)
    kv_tok = torch.stack([b["kv"].sum((0, 2)) for b in per_batch])         # (batches, 5)
    assert torch.allclose(signed[("vpt", 3)][:, 0], vpt_tok.mean(0), atol=1e-6)
    assert torch.allclose(absolute[("vpt", 3)][:, 0], vpt_tok.abs().mean(0), atol=1e-6)
    assert torch.allclose(signed[("kv_prompt", 3)][:, 0], kv_tok.mean(0), atol=1e-6)
    vpt_seg = torch.stack([b["vpt"].reshape(8, 4, 12).sum(-1) for b in per_batch]).mean(0)
    assert torch.allclose(seg[("vpt", 3)], vpt_seg, atol=1e-6)
    assert net.module("vpt", 3).gate is None  # scoring leaves no gate behind


def test_token_plan_keeps_highest_scores_and_respects_minimums():
    base = SubnetConfig({"vpt": [4, 2, 0], "kv_prompt": [3, 1, 2]})
    scores = {("vpt", 0): torch.tensor([[0.1], [0.9], [0.5], [0.3]]), ("vpt", 1): torch.tensor([[1.0], [2.0]]),
              ("kv_prompt", 0): torch.tensor([[3.0], [1.0], [2.0]]), ("kv_prompt", 1): torch.tensor([[5.0]]),
              ("kv_prompt", 2): torch.tensor([[1.0], [0.0]])}
    plan = P.plan_tokens(scores, base, 0.5)
    assert plan.kept["vpt"] == ((1, 2), (1,), ())
    assert plan.kept["kv_prompt"] == ((0, 2), (0,), (0,))
    heavy = P.plan_tokens(scores, base, 0.99)
    assert heavy.config().layer_widths("vpt") == (1, 1, 0)          # VPT layers keep >= 1
    assert heavy.config().layer_widths("kv_prompt") == (1, 1, 1)    # fractions < 1: one stays
    two = P.plan_tokens(scores, base, 0.0, min_vpt_tokens=2)
    seg = P.plan_segments(two, {("vpt", 0): torch.tensor([[0.0] * 4, [9.0, 0, 0, 0], [0.0] * 4, [8.0, 0.2, 0.3, 0.1]]),
                                ("vpt", 1): torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5] * 4]),
                                ("kv_prompt", 0): torch.tensor([[9.0] * 4, [0.0] * 4, [0.0] * 4]),
                                ("kv_prompt", 1): torch.ones(1, 4), ("kv_prompt", 2): torch.ones(2, 4)}, 0.75, 4,
                          min_vpt_tokens=2)
    assert seg.kept["vpt"] == ((1, 3), (0, 1), ())               # tokens with no segment left go
    assert seg.segment_masks["vpt"][0] == ((1, 0, 0, 0), (1, 1, 1, 0))
    assert seg.segment_masks["vpt"][1] == ((0, 0, 1, 1), (1, 0, 0, 0))  # min 2 VPT: best dead revived
    assert seg.kept["kv_prompt"][0] == (0,)
    assert seg.config().layer_widths("vpt") == (2, 2, 0)


def test_pruned_segments_stay_zero_while_training():
    net = _model()
    plan = _random_plan(net, 2, segments=4)
    pruned = P.apply_plan(net, plan).train()
    mod = pruned.module("vpt", 0)
    zero = expand_gate(plan.masks("vpt", 0), 48) == 0
    assert zero.any() and (mod.prompts[zero] == 0).all()
    opt = torch.optim.AdamW([p for p in pruned.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for x, y in _batches(3):
        opt.zero_grad()
        F.cross_entropy(pruned(x), y).backward()
        assert (mod.prompts.grad[zero] == 0).all() and mod.prompts.grad[~zero].abs().sum() > 0
        opt.step()
    assert (mod.prompts[zero] == 0).all()


def _initial_state(net: PromptedViT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.trainable_state_dict().items()}


def _rewound(plan: P.PrunePlan, seed: int) -> PromptedViT:
    """What the e2vpt-pruned retraining does: the model built again under the first run's seed,
    with the plan applied."""
    torch.manual_seed(seed)
    fresh = PromptedViT(create_backbone(MODEL, 5), CFG, recipe="modern")
    fresh.set_active(plan.base)
    return P.apply_plan(fresh, plan)


def test_prune_then_rewind_resets_kept_prompts_to_saved_init():
    torch.manual_seed(0)
    net = PromptedViT(create_backbone(MODEL, 5), CFG, recipe="modern")
    init = _initial_state(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    for x, y in _batches(2):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    cfg = P.PruneConfig(token_fraction=0.5, segment_fraction=0.25, num_segments=4, score_batches=2)
    pruned, plan = P.prune(net, _batches(2), cfg)
    rewound = _rewound(plan, 0)
    for i, toks in enumerate(plan.kept["vpt"]):
        if not toks:
            continue
        start = init[f"vit.blocks.{i}.vpt.prompts"][list(toks)]
        trained = net.module("vpt", i).prompts[list(toks)].detach()
        mask = plan.masks("vpt", i)
        if mask is not None:
            keep = expand_gate(mask, 48)
            start, trained = start * keep, trained * keep
        assert torch.equal(rewound.module("vpt", i).prompts.detach(), start)
        assert torch.equal(pruned.module("vpt", i).prompts.detach(), trained)
        assert not torch.equal(start, trained)
    toks = plan.kept["kv_prompt"][3]
    ref = init["vit.blocks.3.block.attn.kv_prompt.value"][:, list(toks)]
    mask = plan.masks("kv_prompt", 3)
    if mask is not None:
        ref = ref * expand_gate(mask, 48).reshape(len(toks), 3, 16).transpose(0, 1)
    assert torch.equal(rewound.module("kv_prompt", 3).value.detach(), ref)
    assert torch.equal(rewound.vit.head.weight.detach(), init["vit.head.weight"])


def test_bad_prune_settings_are_refused():
    with pytest.raises(ConfigError, match="prune.token_fraction: 1.5 must be in"):
        P.PruneConfig(token_fraction=1.5)
    with pytest.raises(ConfigError, match="prune.score: 'sign' unknown"):
        P.PruneConfig(score="sign")
    net = _model()
    with pytest.raises(ConfigError, match="num_segments 5 must divide the embed dim 48"):
        P.mask_scores(net, _batches(1), num_segments=5)
    plan = _random_plan(net, 0)
    net.set_active(SubnetConfig({**CFG.to_dict(), "vpt": [min(w, 1) for w in CFG.layer_widths("vpt")]}))
    with pytest.raises(ConfigError, match="set_active\\(plan.base\\) first"):
        P.apply_plan(net, plan)
    with pytest.raises(ConfigError, match="prune plan is malformed"):
        P.PrunePlan.from_dict({"kept": {}})


def test_rewound_model_retrains_and_round_trips_through_s3(s3_bucket):
    """Retrain a rewound model, save it as training does (weights + plan in meta.json), rebuild
    it at ``plan.config()`` with its gates re-installed (as ``interop.model_from_run``)."""
    from noah_ray.store import storage

    endpoint, bucket = s3_bucket
    torch.manual_seed(4)
    net = PromptedViT(create_backbone(MODEL, 5), CFG, recipe="modern")
    batches = _batches(3)
    cfg = P.PruneConfig(token_fraction=0.4, segment_fraction=0.3, num_segments=4, score_batches=3)
    _, plan = P.prune(net, batches, cfg)
    model = _rewound(plan, 4)

    def loss():
        model.eval()
        with torch.no_grad():
            return sum(float(F.cross_entropy(model(x), y)) for x, y in batches)

    before = loss()
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    model.train()
    for step in range(30):
        x, y = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert loss() < 0.9 * before
    zero = expand_gate(plan.masks("vpt", 0), 48) == 0
    assert zero.any() and (model.module("vpt", 0).prompts[zero] == 0).all()

    loc = storage.resolve(f"s3://{bucket}/pruned", endpoint)
    storage.save_state(loc, model.trainable_state_dict(), {"prune_plan": plan.to_dict()})
    tensors, meta = storage.load_state(loc)
    plan2 = P.PrunePlan.from_dict(meta["prune_plan"])
    loaded = PromptedViT(net.backbone(), plan2.config(), recipe="modern")
    loaded.load_trainable_state_dict(tensors)
    P.install_gates(loaded, plan2)
    assert plan2 == plan and loaded.active == plan.config()
    x = batches[0][0]
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert torch.equal(loaded.module("vpt", 0).gate, plan.masks("vpt", 0))  # gates re-installed


def test_segment_scores_of_pruned_segments_are_zero():
    net = _model()
    plan = _random_plan(net, 3, segments=4)
    pruned = P.apply_plan(net, plan)
    scores = P.mask_scores(pruned, _batches(1), num_segments=4, modules=["vpt"])
    for i, toks in enumerate(plan.kept["vpt"]):
        mask = plan.masks("vpt", i)
        if toks and mask is not None:
            assert (scores[("vpt", i)][mask == 0] == 0).all()
            assert scores[("vpt", i)][mask == 1].abs().sum() > 0
    assert pruned.module("vpt", 0).gate is not None or plan.masks("vpt", 0) is None  # fixed gate kept


# ----------------------------------------------------------------------------- in the retraining job
@pytest.mark.slow
def test_e2vpt_retraining_prunes_rewinds_and_retrains_on_ray(ray_session, tmp_path, tiny_job):
    """The job's ``prune`` section: the e2vpt run is followed by scoring, a stored plan and a
    second (rewound, pruned) run whose row reports fewer, effective parameters."""
    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.interop import model_from_run
    from noah_ray.run.preflight import resolve
    from noah_ray.store import storage
    from noah_ray.train.runs import retrain, retrain_seeds

    write_generated_vtab(tmp_path / "data", "gen_color", num_train=48, num_val=16, num_test=16)
    spec = tiny_job(tmp_path / "data", tmp_path / "out", name="e2", data={"batch_size": 16},
                    model={"name": MODEL, "recipe": "modern"},   # our pruning: per layer, KV too
                    space=None, supernet=None, search=None,
                    retrain={"epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "seeds": [0], "baselines": ["e2vpt"],
                             "baseline_widths": {"e2vpt": {"vpt": 4, "kv_prompt": 4}}},
                    prune={"token_fraction": 0.5, "segment_fraction": 0.25, "num_segments": 4, "score_batches": 2})
    job = JobConfig.from_dict(spec)
    resolve(job)
    assert JobConfig.from_dict(job.to_dict()).prune == job.prune  # round trip (YAML-safe lists)
    summary = retrain_seeds(resolve(job, ("retrain",)), None, method="e2vpt")
    assert summary["method"] == "e2vpt-pruned"
    root = storage.resolve(job.storage).join(job.name)
    runs = storage.read_table(root.join("retrain"), "runs").to_pandas().set_index("method")
    assert set(runs.index) == {"e2vpt", "e2vpt-pruned"}
    dense, pruned = runs.loc["e2vpt"], runs.loc["e2vpt-pruned"]
    d_cfg, p_cfg = (SubnetConfig.from_json(r["config_json"]) for r in (dense, pruned))
    assert d_cfg.layer_widths("vpt") == (4,) * 12 and p_cfg.layer_widths("vpt") == (2,) * 12  # tokens removed
    assert p_cfg.layer_widths("kv_prompt") == (2,) * 12
    # VPT 2 x 48 and KV 2 x 2 x 48 per layer, 1/4 of the segments zeroed: 3/4 of that is effective
    assert pruned["params"] == 12 * (2 * 48 + 2 * 2 * 48) * 3 // 4 < dense["params"] == 12 * (4 * 48 + 4 * 2 * 48)
    assert 0 <= pruned["test_acc"] <= 100
    saved = json.loads(storage.read_text(storage.resolve(dense["checkpoint_uri"]).join("prune_plan.json")))
    plan = P.PrunePlan.from_dict(saved["plan"])
    assert plan.config() == p_cfg
    # the pruned run's best weights load onto the backbone with the plan's gates: zeroed segments stay 0
    tensors, _ = storage.load_state(storage.resolve(pruned["checkpoint_uri"]))
    prompts = [v for k, v in tensors.items() if k.endswith("vpt.prompts")]
    assert prompts and all((p.reshape(p.shape[0], 4, -1).abs().sum(-1) == 0).any() for p in prompts)
    job.save(tmp_path / "job.yaml")  # `noah-ray export job.yaml --run e2vpt-pruned-seed0` reads it like this
    model, *_ = model_from_run(str(tmp_path / "job.yaml"), "e2vpt-pruned-seed0")
    assert model.capacity == p_cfg and model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    again = retrain(resolve(job, ("retrain",)), None, method="e2vpt", seed=0)  # finished: reused, no third row
    assert again.metrics["test_acc"] == pruned["test_acc"]
    assert len(storage.read_table(root.join("retrain"), "runs")) == 2
    bad = JobConfig.from_dict({**spec, "retrain": {**spec["retrain"], "baselines": ["lora"]}})
    with pytest.raises(ConfigError, match="prune section applies to the e2vpt retraining only"):
        resolve(bad)
    with pytest.raises(ConfigError, match="prune.num_segments 5 must divide"):
        resolve(JobConfig.from_dict({**spec, "prune": {"num_segments": 5}}))
