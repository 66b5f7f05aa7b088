"""The hot-path operations of the prompt modules, checked against their definitions: inverted
dropout's distribution and reproducibility, the token splice's values and gradients, and the
thin linear product's values and gradients (against the sum written out and finite differences)."""

import math

import pytest
import torch

from noah_ray.nn.modules.fast_ops import dropout, splice, thin_linear


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_each_element_with_probability_one_minus_p_scaled(p):
    x = torch.rand(1000, 1000) + 1.0                       # no zeros
    torch.manual_seed(0)
    y = dropout(x, p, True)
    kept = y != 0
    n = x.numel()
    # binomial mean n(1-p), sd sqrt(n p (1-p)): within 5 sd
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    scale = torch.tensor(1.0).div_(1 - p)                  # F.dropout's noise value, 1 / (1 - p) in float32
    assert torch.equal(y[kept], x[kept] * scale)
    # independence: neighbours (rows, columns) agree as often as independent draws would
    for a, b in ((kept[:, 1:], kept[:, :-1]), (kept[1:], kept[:-1])):
        both = (a & b).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 0.005


def test_dropout_is_reproducible_under_torch_seed_and_fresh_per_call():
    x = torch.ones(64, 75, 48)
    torch.manual_seed(3)
    a, b = dropout(x, 0.1, True), dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1, True), a) and not torch.equal(a, b)
    state = torch.get_rng_state()                          # saved / restored RNG state replays it
    c = dropout(x, 0.1, True)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.1, True), c)


def test_dropout_is_the_identity_in_eval_or_at_zero_and_flows_gradients_through_the_mask():
    x = torch.randn(8, 5, requires_grad=True)
    assert dropout(x, 0.3, False) is x and dropout(x, 0.0, True) is x
    y = dropout(x, 0.5, True)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() * 2.0)
    assert dropout(torch.ones(4, dtype=torch.bfloat16), 0.5, True).dtype == torch.bfloat16


@pytest.mark.parametrize("start,n_old,n_new", [(1, 0, 3), (1, 3, 3), (1, 5, 2), (0, 2, 4), (1, 4, 0)])
def test_splice_replaces_tokens_and_routes_gradients(start, n_old, n_new):
    x = torch.randn(2, 9, 4, requires_grad=True)
    p = torch.randn(2, n_new, 4, requires_grad=True) if n_new else None
    out = splice(x, p, start, n_old)
    want = [x[:, :start]] + ([p] if p is not None else []) + [x[:, start + n_old:]]
    assert torch.equal(out, torch.cat(want, 1))
    g = torch.randn_like(out)
    out.backward(g)
    gx = torch.zeros(2, 9, 4)                              # d out / d x: the kept tokens' gradients, 0 at the replaced ones
    gx[:, :start] = g[:, :start]
    gx[:, start + n_old:] = g[:, start + n_new:]
    assert torch.equal(x.grad, gx)
    if p is not None:
        assert torch.equal(p.grad, g[:, start:start + n_new])


@pytest.mark.parametrize("out_features,in_features", [(5, 12), (12, 5), (1, 9), (9, 1)])
@pytest.mark.parametrize("with_bias,with_base,alpha", [(False, False, 1.0), (True, False, 1.0),
                                                      (False, True, 0.7), (True, True, 2.0)])
def test_thin_linear_is_base_plus_alpha_x_wt_plus_bias_with_exact_gradients(out_features, in_features, with_bias,
                                                                           with_base, alpha):
    torch.manual_seed(0)
    dd = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(2, 7, in_features, **dd), torch.randn(out_features, in_features, **dd)
    b, base = torch.randn(out_features, **dd), torch.randn(2, 7, out_features, **dd)

    def f(x, w, b, base):
        return thin_linear(x, w, b if with_bias else None, base=base if with_base else None, alpha=alpha)

    # the definition, written out element by element: y[i, j] = base[i, j] + alpha * sum_k x[i, k] w[j, k] + b[j]
    want = torch.einsum("bnk,jk->bnj", x, w) * alpha + (base if with_base else 0) + (b if with_bias else 0)
    assert torch.allclose(f(x, w, b, base), want, atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(f, (x, w, b, base))   # backward against finite differences


def test_thin_linear_under_autocast_computes_in_low_precision():
    x, w = torch.randn(3, 16), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = thin_linear(x, w, base=torch.zeros(3, 4, dtype=torch.bfloat16))   # base: a bf16 layer output
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x @ w.T, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("with_base,alpha", [(False, 1.0), (True, 1.0), (False, 0.5), (True, 0.5)])
def test_thin_linear_under_autocast_keeps_the_layer_dtype_and_the_definition(with_base, alpha):
    """Under autocast the plain torch ops run, so an fp32 bias is cast like F.linear's (an adapter
    in a bf16 model stays bf16)."""
    x, w, b = torch.randn(3, 16), torch.randn(4, 16), torch.randn(4)
    base = torch.randn(3, 4).bfloat16() if with_base else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = thin_linear(x, w, b, base=base, alpha=alpha)
    assert y.dtype == torch.bfloat16
    want = alpha * x @ w.T + b + (base.float() if with_base else 0)
    assert torch.allclose(y.float(), want, atol=0.15, rtol=0.02)


def test_under_torch_compile_the_ops_are_their_plain_expressions():
    """Traced by dynamo (``backend="eager"``: no code generation), each op is its definition:
    ``base + alpha * x W^T + b``, the spliced sequence, and a dropout whose elements are 0 or
    ``x / (1 - p)`` with about ``1 - p`` of them kept (10^5 draws: 5 standard deviations is 0.0067)."""
    torch.manual_seed(0)
    x, w, b, base = torch.randn(4, 6, 8), torch.randn(3, 8), torch.randn(3), torch.randn(4, 6, 3)
    lin = torch.compile(lambda x: thin_linear(x, w, b, base=base, alpha=0.5), backend="eager", fullgraph=True)
    torch.testing.assert_close(lin(x), base + 0.5 * torch.einsum("btk,ok->bto", x, w) + b)
    p = torch.randn(4, 2, 8)
    spl = torch.compile(lambda x, p: splice(x, p, 1, 3), backend="eager", fullgraph=True)
    assert torch.equal(spl(x, p), torch.cat([x[:, :1], p, x[:, 4:]], dim=1))
    ones = torch.ones(100_000)
    drop = torch.compile(lambda t: dropout(t, 0.25, True), backend="eager", fullgraph=True)
    y = drop(ones)
    assert torch.isin(torch.unique(y), torch.tensor([0.0, 1.0 / 0.75])).all()   # float32 values
    assert abs((y > 0).float().mean().item() - 0.75) < 0.0067
