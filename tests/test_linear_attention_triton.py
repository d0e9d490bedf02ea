"""The fused Triton linear-attention kernels against the float64 reference, forward and gradients.

Without CUDA the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) on
tiny shapes; the ``gpu`` tests repeat the comparisons at realistic sizes on a CUDA device.
Every test here runs with fresh allocations filled with NaN, so an element that a kernel forgets
to write (output, gradient or workspace) fails the comparison.
"""

import importlib

import pytest
import torch

from lindiff.kernels.linear_attention import linear_attention, linear_attention_reference

tla = pytest.importorskip("lindiff.kernels.linear_attention.triton_linear_attention")
la_pkg = importlib.import_module("lindiff.kernels.linear_attention")

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def strided(batch, tokens, heads, dim, layout, dtype, device=DEVICE, positive=False, dim_stride=1):
    """A non-contiguous input: a slice of a wider projection (``bnhd``) or a transposed one (``bhnd``)."""
    wide = torch.randn(batch, tokens, heads * dim + 3, dim_stride, device=device).to(dtype)
    wide = (wide.abs() if positive else wide)[..., 0]
    if layout == "bnhd":
        return wide[..., : heads * dim].unflatten(-1, (heads, dim))
    return wide[..., : heads * dim].unflatten(-1, (heads, dim)).transpose(1, 2)


def compare(
    batch=1,
    heads=2,
    n_q=37,
    n_k=None,
    dim=40,
    dim_v=None,
    dtype=torch.float32,
    layout="bnhd",
    feature_map="elu1",
    eps=1e-4,
    kv_scale="mean",
    dim_stride=1,
    device=DEVICE,
    tol=None,
):
    """Run the kernels and the float64 reference on the same inputs and a random ``dO``."""
    n_k = n_q if n_k is None else n_k
    dim_v = dim if dim_v is None else dim_v
    positive = feature_map == "identity"
    q = strided(batch, n_q, heads, dim, layout, dtype, device, positive, dim_stride)
    k = strided(batch, n_k, heads, dim, layout, dtype, device, positive, dim_stride)
    v = strided(batch, n_k, heads, dim_v, layout, dtype, device, False, dim_stride)
    assert min(n_q, n_k) == 1 or not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kwargs = dict(feature_map=feature_map, eps=eps, layout=layout, kv_scale=kv_scale)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, backend="triton", **kwargs)
    grad = torch.randn_like(out).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided dO
    grads = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scale = None if kv_scale == "mean" else kv_scale
    ref = linear_attention_reference(*ref_leaves, feature_map, eps, layout, scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())

    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    tol = TOLERANCE[dtype] if tol is None else tol
    for name, got, want in zip(("o", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        assert got.shape == want.shape and got.dtype == dtype, name
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("dim", [32, 40, 64, 80, 128, 160])
def test_head_dims(dim):
    compare(n_q=19 if dim == 160 else 37, dim=dim, layout="bhnd" if dim in (40, 128) else "bnhd")


@pytest.mark.parametrize("n", [1, 63, 130])
def test_token_counts_not_multiple_of_block(n):
    # N = 1 leaves q and k almost without influence on o (only through eps); a large eps keeps
    # their gradients well conditioned enough to compare.
    compare(n_q=n, eps=1.0 if n == 1 else 1e-4, layout="bhnd" if n == 63 else "bnhd")


@pytest.mark.parametrize("n_q, n_k", [(5, 70), (70, 9)])
def test_query_and_key_counts_differ(n_q, n_k):
    compare(n_q=n_q, n_k=n_k, kv_scale=0.25)


@pytest.mark.parametrize("dim, dim_v", [(40, 80), (64, 32), (32, 160)])
def test_value_dim_differs(dim, dim_v):
    compare(n_q=21, dim=dim, dim_v=dim_v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_half_precision(dtype, layout):
    compare(n_q=45, dim=40, dtype=dtype, layout=layout)


@pytest.mark.parametrize("feature_map", ["relu", "identity"])
def test_other_feature_maps(feature_map):
    compare(batch=2, n_q=33, dim=32, feature_map=feature_map, kv_scale=1.0)


@pytest.mark.parametrize("eps", [0.0, 10.0])
def test_eps_edge_cases(eps):
    compare(n_q=29, dim=32, eps=eps)


def test_inner_dim_stride():
    """Inputs whose head dim is not unit-stride (strides are passed to the kernel as they are)."""
    compare(n_q=20, dim=32, dim_stride=2)
    compare(n_q=20, dim=32, dim_stride=2, layout="bhnd")


@pytest.mark.parametrize("sms", [1, 64])
def test_split_counts(monkeypatch, sms):
    """One program per head walking many tiles, and many splits of one or two tiles each."""
    monkeypatch.setattr(tla, "_sm_count", lambda device: sms)
    device = torch.device(DEVICE)
    splits, per_split = tla._split(300, 2, tla._config(32, 32, torch.float32, device), device)
    assert (splits > 1) == (sms > 1) and (per_split > 1) == (sms == 1)
    compare(n_q=300, dim=32)


def test_split_plan_is_bounded_by_programs():
    cfg = tla._config(64, 64, torch.float16, torch.device("cpu"))
    target = tla.PROGRAMS_PER_SM * tla.INTERPRETER_SMS
    for n in (1, 31, 32, 33, 1000, 1 << 20):
        splits, per_split = tla._split(n, 1, cfg, torch.device("cpu"))
        tiles = -(-n // cfg.block_n)
        assert 1 <= splits <= target and splits * per_split >= tiles > (splits - 1) * per_split


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE).transpose(1, 2) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lindiff.linear_attention.default, (q, k, v, "elu1", 1e-4, "bnhd", None))


def test_compiles_without_graph_breaks():
    """Dynamo sees the custom op; AOTAutograd traces the backward through the backward op."""

    def layer(q, k, v):
        return linear_attention(q, k, v, kv_scale="mean", backend="triton").flatten(2) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    q, k, v = (strided(1, 40, 2, 32, "bnhd", torch.float32) for _ in range(3))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    torch.testing.assert_close(out, layer(q, k, v))
    grads = torch.autograd.grad(out.sum(), leaves)
    eager = torch.autograd.grad(layer(*leaves).sum(), leaves)
    for got, want in zip(grads, eager, strict=True):
        torch.testing.assert_close(got, want)


def test_deterministic():
    q, k, v = (strided(1, 100, 2, 40, "bnhd", torch.float32).requires_grad_() for _ in range(3))
    runs = []
    for _ in range(2):
        out = linear_attention(q, k, v, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# --- CUDA: realistic sizes, auto dispatch, determinism, torch.compile with Inductor -------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(n, dtype):
    compare(batch=2, heads=4, n_q=n, dim=64, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dim, dim_v", [(40, 40), (80, 80), (128, 128), (160, 160), (40, 160)])
def test_gpu_head_dims(dim, dim_v):
    compare(
        batch=2, heads=3, n_q=4096, dim=dim, dim_v=dim_v, dtype=torch.bfloat16, layout="bhnd", device="cuda"
    )


@pytest.mark.gpu
def test_gpu_auto_backend_uses_kernels(monkeypatch):
    calls = []
    real = la_pkg.linear_attention_op
    monkeypatch.setattr(la_pkg, "linear_attention_op", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 64, 2, 32, device="cuda", dtype=torch.float16)
    linear_attention(q, q, q)
    assert calls == [1]
    linear_attention(q.double(), q.double(), q.double())  # float64: the reference, logged once
    assert calls == [1]


@pytest.mark.gpu
def test_gpu_deterministic():
    q, k, v = (strided(2, 65537, 8, 64, "bnhd", torch.bfloat16, "cuda").requires_grad_() for _ in range(3))
    runs = []
    for _ in range(2):
        out = linear_attention(q, k, v, kv_scale="mean")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_compiles_without_graph_breaks():
    def layer(q, k, v):
        return linear_attention(q, k, v, kv_scale="mean").flatten(2) * 2.0

    compiled = torch.compile(layer, fullgraph=True)
    q, k, v = (strided(2, 4096, 8, 64, "bnhd", torch.float16, "cuda") for _ in range(3))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    torch.testing.assert_close(out, layer(q, k, v))
    grads = torch.autograd.grad(out.float().sum(), leaves)
    eager = torch.autograd.grad(layer(*leaves).float().sum(), leaves)
    for got, want in zip(grads, eager, strict=True):
        torch.testing.assert_close(got, want)
