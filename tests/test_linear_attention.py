"""The public linear-attention op on its reference path: math, layouts, precision, validation."""

import importlib

import pytest
import torch

from lindiff.kernels.linear_attention import (
    FEATURE_MAPS,
    linear_attention,
    linear_attention_from_state,
    linear_attention_quadratic,
    linear_attention_reference,
    linear_attention_state,
    reference,
)

# The subpackage itself (``lindiff.kernels.linear_attention`` the attribute is the function).
la_pkg = importlib.import_module("lindiff.kernels.linear_attention")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(batch, n_q, n_k, heads, dim, dim_v, dtype=torch.float64, positive=False):
    q = torch.randn(batch, n_q, heads, dim, dtype=dtype)
    k = torch.randn(batch, n_k, heads, dim, dtype=dtype)
    v = torch.randn(batch, n_k, heads, dim_v, dtype=dtype)
    return (q.abs(), k.abs(), v) if positive else (q, k, v)


def to_layout(t, layout):
    return t.transpose(1, 2) if layout == "bhnd" else t


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("kv_scale", [0.37, "mean"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_equals_quadratic_formula(feature_map, layout, kv_scale, normalize):
    # Signed identity features only without the normaliser (which they could drive to zero).
    q, k, v = qkv(2, 23, 17, 3, 8, 5, positive=feature_map == "identity" and normalize)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = linear_attention(
        *(to_layout(t, layout) for t in leaves),
        feature_map=feature_map,
        eps=1e-3,
        layout=layout,
        kv_scale=kv_scale,
        backend="reference",
        normalize=normalize,
    )
    out = to_layout(out, layout)
    want = linear_attention_quadratic(
        *leaves,
        feature_map,
        eps=1e-3,
        kv_scale=None if kv_scale == "mean" else kv_scale,
        normalize=normalize,
    )
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(want, leaves, grad)
    for name, a, b in zip("qkv", got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_inference_path_equals_autograd_path(monkeypatch, layout, normalize):
    """Without autograd the reference streams chunks into a preallocated output; same numbers."""
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 700)  # a handful of tokens per chunk
    q, k, v = (to_layout(t, layout) for t in qkv(2, 53, 41, 2, 6, 7, dtype=torch.float32))
    with torch.no_grad():
        chunked = linear_attention_reference(q, k, v, "elu1", 1e-4, layout, None, normalize)
    whole = linear_attention_reference(q.requires_grad_(), k, v, "elu1", 1e-4, layout, None, normalize)
    assert chunked.is_contiguous() and chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole.detach(), rtol=1e-5, atol=1e-6)


def test_strided_views_and_output_layout():
    """LinFusion passes (B, N, H, D) views of a fused projection; output is contiguous (B, N, H, D_v)."""
    batch, n, heads, dim = 2, 31, 4, 10
    fused = torch.randn(batch, n, 3 * heads * dim)
    q, k, v = (
        fused[..., i * heads * dim : (i + 1) * heads * dim].unflatten(-1, (heads, dim)) for i in range(3)
    )
    assert not q.is_contiguous()
    with torch.no_grad():
        out = linear_attention(q, k, v, kv_scale="mean")
    assert out.shape == (batch, n, heads, dim) and out.is_contiguous()
    want = linear_attention_quadratic(q, k, v, "elu1", eps=1e-4, kv_scale=None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)

    out_bhnd = linear_attention(*(t.transpose(1, 2) for t in (q, k, v)), layout="bhnd", kv_scale="mean")
    assert out_bhnd.shape == (batch, heads, n, dim) and out_bhnd.is_contiguous()
    torch.testing.assert_close(out_bhnd.transpose(1, 2), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_unnormalized_is_the_numerator_einsum(layout):
    """``normalize=False``: ``o_i = s * sum_j (phi(q_i) . phi(k_j)) v_j``, written out; ``eps`` is unused."""
    q, k, v = qkv(2, 9, 13, 3, 8, 5)
    out = linear_attention(
        *(to_layout(t, layout) for t in (q, k, v)),
        feature_map="relu",
        eps=123.0,
        layout=layout,
        kv_scale=0.5,
        normalize=False,
    )
    want = 0.5 * torch.einsum("bnhd,bmhd,bmhe->bnhe", q.relu(), k.relu(), v)
    torch.testing.assert_close(to_layout(out, layout), want, rtol=1e-12, atol=1e-12)
    state = linear_attention_state(
        to_layout(k, layout), to_layout(v, layout), feature_map="relu", layout=layout
    )
    from_state = linear_attention_from_state(
        to_layout(q, layout), state * 0.5, feature_map="relu", layout=layout, normalize=False
    )
    torch.testing.assert_close(to_layout(from_state, layout), want, rtol=1e-12, atol=1e-12)


def test_value_dim_and_token_counts_may_differ():
    q, k, v = qkv(1, 5, 12, 2, 8, 3)
    out = linear_attention(q, k, v, kv_scale=2.0)
    assert out.shape == (1, 5, 2, 3)
    torch.testing.assert_close(out, linear_attention_quadratic(q, k, v, "elu1", 1e-4, 2.0))


def test_empty_query_set():
    q, k, v = qkv(1, 0, 4, 2, 8, 3, dtype=torch.float32)
    assert linear_attention(q, k, v).shape == (1, 0, 2, 3)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = qkv(2, 40, 40, 2, 16, 16, dtype=torch.float32)
    out = linear_attention(*(t.to(dtype) for t in (q, k, v)), kv_scale="mean")
    assert out.dtype == dtype
    assert rel_err(out, linear_attention(q, k, v, kv_scale="mean")) < tol


def test_fp16_long_sequence_is_finite_and_matches_fp32():
    """2^20 tokens: the state accumulates in float32 and is mean-scaled, so nothing overflows."""
    n = 1 << 20
    q, k, v = qkv(1, n, n, 1, 32, 32, dtype=torch.float16)
    k = k + 3.0  # large keys: sum_j phi(k_j) ~ 4 * 2^20 would overflow float16
    with torch.no_grad():
        out = linear_attention(q, k, v, kv_scale="mean")
        want = linear_attention(q.float(), k.float(), v.float(), kv_scale="mean")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out, want) < 2e-3


def test_compiles_without_graph_breaks_on_cpu():
    """``fullgraph=True`` fails on any graph break; aot_eager also traces the backward."""

    def layer(q, k, v):
        return linear_attention(q, k, v, kv_scale="mean").flatten(2) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    q, k, v = qkv(2, 33, 33, 2, 8, 8, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    torch.testing.assert_close(out, layer(q, k, v), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_auto_backend_runs_reference_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton op must not run for CPU inputs with backend='auto'")

    monkeypatch.setattr(la_pkg, "linear_attention_op", fail)
    q, k, v = qkv(1, 4, 4, 1, 8, 8)
    torch.testing.assert_close(linear_attention(q, k, v), linear_attention_reference(q, k, v))


GOOD = dict(q=(1, 4, 2, 8), k=(1, 6, 2, 8), v=(1, 6, 2, 5))


def call(q=GOOD["q"], k=GOOD["k"], v=GOOD["v"], dtype=torch.float32, **kwargs):
    make = lambda s: torch.randn(s).to(dtype) if isinstance(s, tuple) else s
    return linear_attention(make(q), make(k), make(v), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(backend="cuda"), ValueError, ["backend", "'auto'", "'triton'", "'reference'", "'cuda'"]),
        (dict(layout="nhd"), ValueError, ["layout", "'bnhd'", "'bhnd'", "'nhd'"]),
        (dict(feature_map="softmax"), ValueError, ["feature_map", "'elu1'", "'relu'", "'softmax'"]),
        (dict(dtype=torch.int32), TypeError, ["float32", "int32"]),
        (dict(q=[1.0]), TypeError, ["q", "torch.Tensor", "list"]),
        (dict(q=(1, 4, 8)), ValueError, ["q", "4-D", "(1, 4, 8)"]),
        (dict(k=(2, 6, 2, 8)), ValueError, ["batch"]),
        (dict(v=(1, 6, 3, 5)), ValueError, ["head counts", "3"]),
        (dict(k=(1, 6, 2, 4)), ValueError, ["head dims", "8", "4"]),
        (dict(v=(1, 7, 2, 5)), ValueError, ["token counts", "6", "7"]),
        (dict(k=(1, 0, 2, 8), v=(1, 0, 2, 5)), ValueError, ["at least one token"]),
        (dict(eps=-1.0), ValueError, ["eps", "-1.0"]),
        (dict(kv_scale="sum"), ValueError, ["kv_scale", "'mean'", "'sum'"]),
        (dict(kv_scale=0.0), ValueError, ["kv_scale", "positive"]),
        (dict(normalize="no"), TypeError, ["normalize", "bool", "'no'"]),
        (dict(normalize=0), TypeError, ["normalize", "bool", "0"]),
        (dict(normalize=None, backend="triton"), TypeError, ["normalize", "None"]),
    ],
)
def test_invalid_inputs_name_the_argument(kwargs, error, words):
    with pytest.raises(error) as info:
        call(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_from_state_checks_normalize():
    q = torch.randn(1, 4, 2, 8)
    state = linear_attention_state(q, q)
    with pytest.raises(TypeError, match=r"normalize must be a bool .* got 'False'"):
        linear_attention_from_state(q, state, normalize="False")


def test_mixed_dtypes_rejected():
    with pytest.raises(TypeError, match="share a dtype"):
        linear_attention(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4).double(), torch.randn(1, 2, 1, 4))


def test_triton_backend_errors(monkeypatch):
    with pytest.raises(TypeError, match="float64"):
        call(dtype=torch.float64, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        call(backend="triton")
    monkeypatch.setattr(la_pkg, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="triton package"):
        call(backend="triton")
    assert call(backend="auto").shape == (1, 4, 2, 5)  # CPU: the reference, Triton or not
