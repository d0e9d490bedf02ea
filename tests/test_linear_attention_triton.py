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
    normalize=True,
):
    """Run the kernels and the float64 reference on the same inputs and a random ``dO``.

    Identity features are positive for the normalised form (a signed denominator can vanish),
    signed for the numerator alone (``normalize=False``: RoPE-rotated features, as SANA-Video's).
    """
    n_k = n_q if n_k is None else n_k
    dim_v = dim if dim_v is None else dim_v
    positive = feature_map == "identity" and normalize
    q = strided(batch, n_q, heads, dim, layout, dtype, device, positive, dim_stride)
    k = strided(batch, n_k, heads, dim, layout, dtype, device, positive, dim_stride)
    v = strided(batch, n_k, heads, dim_v, layout, dtype, device, False, dim_stride)
    assert min(n_q, n_k) == 1 or not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kwargs = dict(feature_map=feature_map, eps=eps, layout=layout, kv_scale=kv_scale, normalize=normalize)

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, backend="triton", **kwargs)
    grad = torch.randn_like(out).transpose(-1, -2).contiguous().transpose(-1, -2)  # strided dO
    grads = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scale = None if kv_scale == "mean" else kv_scale
    ref = linear_attention_reference(*ref_leaves, feature_map, eps, layout, scale, normalize)
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


# --- normalize=False: the numerator phi(q) S alone (SANA-Video's rotated numerator) -------------


@pytest.mark.parametrize(
    ("feature_map", "dtype", "layout", "dim", "kv_scale"),
    [
        ("identity", torch.float32, "bnhd", 40, "mean"),
        ("identity", torch.float32, "bhnd", 112, 1.0),  # SANA-Video's head dim, one 128 tile
        ("identity", torch.bfloat16, "bnhd", 40, "mean"),
        ("identity", torch.float16, "bhnd", 32, "mean"),
        ("relu", torch.float32, "bnhd", 32, 0.25),
        ("elu1", torch.bfloat16, "bhnd", 32, "mean"),
    ],
)
def test_unnormalized(feature_map, dtype, layout, dim, kv_scale):
    """Output, dq, dk and dv of ``normalize=False`` against the float64 reference."""
    compare(
        batch=2,
        n_q=41,
        n_k=29,
        dim=dim,
        dtype=dtype,
        layout=layout,
        feature_map=feature_map,
        kv_scale=kv_scale,
        normalize=False,
    )


def test_unnormalized_eps_is_unused():
    q, k, v = (strided(1, 20, 2, 16, "bnhd", torch.float32) for _ in range(3))
    small, large = (
        linear_attention(q, k, v, feature_map="identity", eps=eps, normalize=False, backend="triton")
        for eps in (0.0, 1e3)
    )
    assert torch.equal(small, large)


def test_unnormalized_tiles_and_splits(monkeypatch):
    """Head dim in several output-pass chunks (NUM_D = 3), value dim in two state tiles (NUM_E = 2),
    several splits; the launchers pass NORMALIZE=False to the output and query-gradient kernels."""
    recorders = {name: LaunchRecorder(getattr(tla, name)) for name in KERNELS}
    for name, recorder in recorders.items():
        monkeypatch.setattr(tla, name, recorder)
    monkeypatch.setattr(tla, "_sm_count", lambda device: 64)
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_D", "16")
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_DV", "16")
    compare(n_q=260, dim=40, dim_v=24, feature_map="identity", normalize=False)
    for name in ("_output_kernel", "_query_grad_kernel"):
        ((grid, kwargs),) = recorders[name].launches
        assert kwargs["NORMALIZE"] is False and grid[0] == 2 and grid[1] > 1, name
    assert recorders["_output_kernel"].launches[0][1]["NUM_D"] == 3


def test_inner_dim_stride():
    """Inputs whose head dim is not unit-stride (strides are passed to the kernel as they are)."""
    compare(n_q=20, dim=32, dim_stride=2)
    compare(n_q=20, dim=32, dim_stride=2, layout="bhnd")


@pytest.mark.parametrize("sms", [1, 64])
def test_split_counts(monkeypatch, sms):
    """One program per head walking all ten tiles, or several splits (of one tile each in the
    output pass; the state pass keeps at least its minimum of tiles per split)."""
    monkeypatch.setattr(tla, "_sm_count", lambda device: sms)
    p = tla._problem(*(torch.empty(1, 300, 2, 32, device=DEVICE) for _ in range(3)), "bnhd")
    st, out = tla.forward_plan(p).state, tla.forward_plan(p).output
    if sms == 1:
        assert st.splits == out.splits == 1
    else:
        assert st.splits > 1 and out.tiles_per_split == 1
    compare(n_q=300, dim=32)


class LaunchRecorder:
    """Stands in for a kernel: records each launch's grid and keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


KERNELS = ("_state_partials_kernel", "_output_kernel", "_query_grad_kernel", "_key_grad_kernel")


@pytest.mark.parametrize(
    ("dtype", "token", "state", "precision"),
    [
        (torch.bfloat16, "bf16", "bf16", "tf32"),
        (torch.float16, "fp16", "fp32", "tf32"),
        (torch.float32, "fp32", "fp32", "ieee"),
    ],
)
def test_launchers_pass_operand_dtypes_and_put_state_tiles_first(monkeypatch, dtype, token, state, precision):
    """bfloat16 multiplies bfloat16 operands (the states too); float16 keeps TF32 against the states."""
    recorders = {name: LaunchRecorder(getattr(tla, name)) for name in KERNELS}
    for name, recorder in recorders.items():
        monkeypatch.setattr(tla, name, recorder)
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_D", "16")  # D = 40 in three state-row tiles
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_DV", "16")  # D_v = 24 in two value tiles
    compare(n_q=70, dim=40, dim_v=24, dtype=dtype)
    emulate = DEVICE != "cuda"
    for name, recorder in recorders.items():
        ((grid, kwargs),) = recorder.launches
        assert kwargs["PRECISION"] == precision and kwargs["EMULATE"] == emulate
        assert kwargs["HEAD_DIM"] == 40 and kwargs["VALUE_DIM"] == 24 and kwargs["BLOCK_DV"] == 16
        assert grid[2] == 2  # batch * heads last; the state tiles first
        if name == "_state_partials_kernel":
            assert kwargs["TOKEN_DOT"] == token and grid[0] == 3 * 2 and kwargs["BLOCK_D"] == 16
        else:
            assert kwargs["STATE_DOT"] == state and grid[0] == 2
        if name in ("_output_kernel", "_query_grad_kernel"):
            assert kwargs["NORMALIZE"] is True
        if name == "_output_kernel":
            assert kwargs["NUM_D"] == 3
        elif name != "_state_partials_kernel":
            assert kwargs["BLOCK_D"] == 64  # the backward holds the whole head dim


def test_alignment_promised_to_the_compiler():
    """``ALIGN`` divides every stride the kernels multiply (16 bytes at most): a wrong promise would
    let the compiled kernels issue misaligned vector loads, which the interpreter cannot show."""
    contiguous = torch.empty(2, 37, 8, 40, dtype=torch.bfloat16)
    assert tla._align(contiguous) == 8  # head stride 40: 80 bytes, a multiple of 16
    assert tla._align(contiguous.float()) == 4
    assert tla._align(contiguous, torch.empty(2, 37, 3, 20, dtype=torch.bfloat16)) == 4
    assert tla._align(torch.empty(2, 37, 3, 9, dtype=torch.bfloat16)) == 1
    assert tla._align(torch.empty(1, 1, 1, 9, dtype=torch.bfloat16)) == 8  # size-1 dims are never stepped
    assert tla._align(strided(2, 37, 2, 40, "bnhd", torch.bfloat16, "cpu")) == 1  # rows of H * D + 3
    assert tla._align(strided(2, 37, 2, 32, "bhnd", torch.float16, "cpu", dim_stride=2)) == 1


def test_env_overrides_run_and_bad_values_raise(monkeypatch):
    """Tiles and pipelining fixed from the environment (the escape hatch for resource errors)."""
    for name, value in [
        ("LINDIFF_LINEAR_BLOCK_D", "32"),
        ("LINDIFF_LINEAR_BLOCK_DV", "32"),
        ("LINDIFF_LINEAR_BLOCK_N", "16"),
        ("LINDIFF_LINEAR_NUM_WARPS", "2"),
        ("LINDIFF_LINEAR_NUM_STAGES", "1"),
    ]:
        monkeypatch.setenv(name, value)
    compare(n_q=19, dim=40, dim_v=80, layout="bhnd")
    monkeypatch.setenv("LINDIFF_LINEAR_NUM_STAGES", "many")
    q = torch.randn(1, 8, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="LINDIFF_LINEAR_NUM_STAGES must be one of"):
        linear_attention(q, q, q, backend="triton")


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE).transpose(1, 2) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lindiff.linear_attention.default, (q, k, v, "elu1", 1e-4, "bnhd", None))
    torch.library.opcheck(
        torch.ops.lindiff.linear_attention.default, (q, k, v, "identity", 1e-4, "bnhd", 1.0, False)
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_compiles_without_graph_breaks(normalize):
    """Dynamo sees the custom op; AOTAutograd traces the backward through the backward op."""

    def layer(q, k, v):
        out = linear_attention(q, k, v, kv_scale="mean", backend="triton", normalize=normalize)
        return out.flatten(2) * 2.0

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_unnormalized_sana_video_shape(dtype):
    """SANA-Video's numerator: 2 x 20 heads x 112, the 32760 tokens of 81 frames at 480 x 832
    (21 x 30 x 52 after the VAE and 1x2x2 patches), signed (rotated) features, mean-scaled."""
    compare(
        batch=2,
        heads=20,
        n_q=32760,
        dim=112,
        dtype=dtype,
        feature_map="identity",
        kv_scale="mean",
        normalize=False,
        device="cuda",
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


def compiled_variants(kernel) -> dict:
    """The compiled variants of a ``triton.jit`` kernel in this process: cache key -> CompiledKernel."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # triton >= 3.2
        return {key: compiled for cache in caches.values() for key, compiled in cache[0].items()}
    return {key: compiled for cache in kernel.cache.values() for key, compiled in cache.items()}


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "token", "state"), [(torch.bfloat16, "bf16", "bf16"), (torch.float16, "f16", "tf32")]
)
def test_gpu_tensor_cores_take_16_bit_operands(dtype, token, state):
    """The PTX of each new kernel multiplies bfloat16 (or float16 k/v, TF32 states) on the tensor cores."""
    before = {name: set(compiled_variants(getattr(tla, name))) for name in KERNELS}
    compare(batch=1, heads=2, n_q=1000, dim=72, dim_v=72, dtype=dtype, device="cuda")
    for name in KERNELS:
        new = [c for key, c in compiled_variants(getattr(tla, name)).items() if key not in before[name]]
        assert new, f"{name} was not compiled anew"
        want = token if name == "_state_partials_kernel" else state
        for compiled in new:
            lines = [line for line in compiled.asm["ptx"].splitlines() if "mma" in line]
            assert any(f".{want}.{want}" in line for line in lines), f"{name}: no {want} mma"


@pytest.mark.gpu
def test_gpu_fp16_state_beyond_half_range():
    """fp16 inputs whose state z = sum_j phi(k_j) is about 1.3e5 (> 65504): TF32 against it."""
    n, heads, dim = 32768, 2, 64
    q, k, v = (torch.randn(1, n, heads, dim, device="cuda") for _ in range(3))
    k = (k + 3.0).half()
    q, v = q.half(), v.half()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, kv_scale=1.0, backend="triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_reference(*ref_leaves, "elu1", 1e-4, "bnhd", 1.0)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, got, want in zip(("o", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < 3e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize(("dim", "dim_v"), [(160, 160), (40, 160)])
def test_gpu_env_overrides_compile(monkeypatch, dim, dim_v):
    """The documented escape hatch for a resource error: smaller tiles, fewer stages."""
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_DV", "32")
    monkeypatch.setenv("LINDIFF_LINEAR_NUM_STAGES", "1")
    compare(batch=1, heads=3, n_q=2048, dim=dim, dim_v=dim_v, dtype=torch.bfloat16, device="cuda")
