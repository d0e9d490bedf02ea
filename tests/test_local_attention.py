"""Local (windowed) attention: chunked and FlexAttention paths against the dense reference."""

import functools
import importlib
import math
import shutil
import warnings

import pytest
import torch

from lindiff.kernels import local_attention
from lindiff.kernels.local_attention import (
    clear_plan_cache,
    flex,
    local_attention_reference,
    merge_attention_states,
    plan_cache_info,
    window_mask,
)
from lindiff.kernels.local_attention.chunked import choose_fused_box, local_attention_chunked
from lindiff.kernels.local_attention.flex import build_plan, get_plan, local_attention_flex
from lindiff.kernels.local_attention.reference import Window, as_grid3, radius_threshold, window_geometry
from lindiff.kernels.local_attention.tiling import (
    BLOCK_SIZE,
    TileLayout,
    block_structure,
    choose_tile,
    count_blocks,
    tile_order,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU = torch.device("cpu")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(grid, num_global=0, layout="bnhd", batch=2, heads=3, dim=8, dim_v=None, dtype=torch.float32):
    """q, k, v and global_kv; ``"bhnd"`` inputs are strided views of ``"bnhd"`` tensors."""
    n = math.prod(grid)
    dim_v = dim if dim_v is None else dim_v

    def tensor(tokens, d):
        x = torch.randn(batch, tokens, heads, d, dtype=dtype)
        return x.transpose(1, 2) if layout == "bhnd" else x

    q, k, v = tensor(n, dim), tensor(n, dim), tensor(n, dim_v)
    global_kv = (tensor(num_global, dim), tensor(num_global, dim_v)) if num_global else None
    return q, k, v, global_kv


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# (grid, radius, global tokens)
CASES = [
    ((6, 6), 0, 0),
    ((6, 6), 1, 0),
    ((5, 7), 1.5, 2),
    ((3, 16), 2.5, 1),
    ((4, 4), 10, 0),
    ((4, 4), math.inf, 3),
    ((2, 4, 5), 1, 0),
    ((2, 4, 5), 1.8, 1),
    ((1, 1), 0, 1),
    ((19, 23), 3.2, 4),
    ((5, 9, 7), 2, 2),
]


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize(("grid", "radius", "num_global"), CASES)
def test_chunked_matches_reference(grid, radius, num_global, layout):
    q, k, v, global_kv = make_inputs(grid, num_global, layout, dim_v=5)
    ref, ref_lse = local_attention_reference(q, k, v, grid, radius, global_kv, layout, return_lse=True)
    out, lse = local_attention(
        q,
        k,
        v,
        grid=grid,
        radius=radius,
        global_kv=global_kv,
        layout=layout,
        backend="chunked",
        return_lse=True,
    )
    assert out.shape == ref.shape and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(lse, ref_lse) < TOL[torch.float32]
    # A small budget forces many query boxes (single cells on small grids); same result, on the
    # fused kernel and on the einsum path.
    grid3 = as_grid3(grid)
    budget = 1 if math.prod(grid) <= 64 else 20_000
    window = window_geometry(radius, None, grid3)
    for fused in (True, False):
        small = local_attention_chunked(
            q, k, v, grid3, window, global_kv, 8**-0.5, layout, budget=budget, fused=fused
        )
        assert rel_err(small, ref) < TOL[torch.float32]


@pytest.mark.parametrize(
    ("grid", "radius", "num_global", "layout", "tile"),
    [
        ((5, 7), 1.5, 0, "bnhd", None),
        ((3, 16), 2, 1, "bhnd", None),
        ((2, 4, 5), 1, 1, "bnhd", None),
        ((4, 4), 10, 0, "bhnd", None),
        ((20, 20), 3, 130, "bnhd", (8, 16)),
        ((4, 12, 11), 2.3, 0, "bhnd", (2, 8, 8)),
    ],
)
def test_flex_matches_reference_on_cpu(grid, radius, num_global, layout, tile):
    """FlexAttention's eager CPU path runs the tiling, padding, global blocks and mask_mod."""
    q, k, v, global_kv = make_inputs(grid, num_global, layout, batch=1, heads=2)
    ref, ref_lse = local_attention_reference(q, k, v, grid, radius, global_kv, layout, return_lse=True)
    out, lse = local_attention(
        q,
        k,
        v,
        grid=grid,
        radius=radius,
        global_kv=global_kv,
        layout=layout,
        backend="flex",
        tile=tile,
        return_lse=True,
    )
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(lse, ref_lse) < TOL[torch.float32]


# (grid, radius, frames_radius, global tokens): cylinders, incl. 0 frames, every frame, more than T.
CYLINDER_CASES = [
    ((3, 4, 5), 1, 0, 0),
    ((3, 4, 5), 1.5, 1, 2),
    ((4, 5, 6), 2.3, 2.5, 0),
    ((5, 6, 7), 2, math.inf, 1),
    ((2, 3, 9), 0, 1, 0),
    ((6, 5, 4), 100, 1, 3),
    ((4, 6, 6), 3, 10, 0),
    ((1, 6, 7), 2, 3, 1),
    ((6, 7), 2, 3, 0),
]


@pytest.mark.parametrize(("grid", "radius", "frames_radius", "num_global"), CYLINDER_CASES)
def test_chunked_cylinder_matches_reference(grid, radius, frames_radius, num_global):
    """float64: the chunked path equals the dense reference up to rounding, for any box size."""
    q, k, v, global_kv = make_inputs(grid, num_global, dim_v=5, dtype=torch.float64)
    ref, ref_lse = local_attention_reference(
        q, k, v, grid, radius, global_kv, return_lse=True, frames_radius=frames_radius
    )
    out, lse = local_attention(
        q, k, v, grid=grid, radius=radius, frames_radius=frames_radius, global_kv=global_kv, return_lse=True
    )
    assert rel_err(out, ref) < TOL[torch.float64] and rel_err(lse, ref_lse) < TOL[torch.float64]
    grid3 = as_grid3(grid)
    window = window_geometry(radius, frames_radius, grid3)
    for fused in (True, False):
        small = local_attention_chunked(q, k, v, grid3, window, global_kv, 8**-0.5, budget=1, fused=fused)
        assert rel_err(small, ref) < TOL[torch.float64]
    # A cylinder is not the ball (except on one frame or where either covers everything).
    ball = local_attention_reference(q, k, v, grid, radius, global_kv)
    assert (rel_err(ball, ref) < TOL[torch.float64]) == (
        window_mask(grid, radius, frames_radius=frames_radius).equal(window_mask(grid, radius))
    )


@pytest.mark.parametrize(
    ("grid", "radius", "frames_radius", "num_global", "layout", "tile"),
    [
        ((3, 4, 5), 1.5, 1, 0, "bnhd", None),
        ((5, 6, 7), 2, math.inf, 2, "bhnd", None),
        ((4, 12, 11), 2.3, 0, 0, "bnhd", (2, 8, 8)),
        ((6, 8, 10), 3, 2, 130, "bhnd", (4, 4, 8)),
    ],
)
def test_flex_cylinder_matches_reference_on_cpu(grid, radius, frames_radius, num_global, layout, tile):
    """FlexAttention's eager CPU path with a cylinder's block mask and ``mask_mod``."""
    q, k, v, global_kv = make_inputs(grid, num_global, layout, batch=1, heads=2)
    ref, ref_lse = local_attention_reference(
        q, k, v, grid, radius, global_kv, layout, return_lse=True, frames_radius=frames_radius
    )
    out, lse = local_attention(
        q,
        k,
        v,
        grid=grid,
        radius=radius,
        frames_radius=frames_radius,
        global_kv=global_kv,
        layout=layout,
        backend="flex",
        tile=tile,
        return_lse=True,
    )
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(lse, ref_lse) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["chunked", "flex"])
@pytest.mark.parametrize("frames_radius", [2, 3.5, math.inf])
def test_cylinder_over_every_frame_and_beyond_a_frames_diagonal_is_full_attention(backend, frames_radius):
    grid = (3, 4, 6)
    q, k, v, global_kv = make_inputs(grid, 2, batch=1, heads=2, dtype=torch.float32)
    diagonal = math.hypot(grid[1] - 1, grid[2] - 1)
    full = local_attention_reference(q, k, v, grid, math.inf, global_kv)
    out = local_attention(
        q, k, v, grid=grid, radius=diagonal, frames_radius=frames_radius, global_kv=global_kv, backend=backend
    )
    assert rel_err(out, full) < TOL[torch.float32]
    # One frame less, or a radius just inside a frame's diagonal, is not.
    for radius, frames in ((diagonal, 1), (diagonal - 0.01, frames_radius)):
        assert rel_err(local_attention(q, k, v, grid=grid, radius=radius, frames_radius=frames), full) > 1e-3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="inductor's CPU backend needs a C++ compiler"
)
def test_compiled_flex_runs_the_block_mask_on_cpu():
    """torch.compile(flex_attention) on CPU executes the block-sparse plan (forward only there),
    for balls and cylinders."""
    for grid, radius, frames_radius, num_global in [
        ((1, 40, 40), 6.5, None, 0),
        ((1, 40, 40), 3, None, 0),
        ((2, 12, 16), 2, None, 77),
        ((4, 12, 16), 2, 1, 77),
        ((4, 12, 16), 3, math.inf, 77),
    ]:
        q, k, v, global_kv = make_inputs(grid, num_global, batch=1, heads=2, dim=16)
        window = window_geometry(radius, frames_radius, grid)
        out = local_attention_flex(
            q, k, v, grid, window, choose_tile(grid, window), global_kv, 0.25, compiled=True
        )
        ref = local_attention_reference(
            q, k, v, grid, radius, global_kv, scale=0.25, frames_radius=frames_radius
        )
        assert rel_err(out, ref) < TOL[torch.float32]


def kernel_mask(block_mask):
    """The ``(L_q, L_kv)`` mask a fused kernel applies: listed partial blocks through ``mask_mod``,
    listed full blocks unmasked, every other block skipped."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    lq, lkv = block_mask.seq_lengths
    token = block_mask.mask_mod(0, 0, torch.arange(lq)[:, None], torch.arange(lkv)[None, :])
    out = torch.zeros(lq, lkv, dtype=torch.bool)
    partial = block_mask.kv_indices[0, 0], block_mask.kv_num_blocks[0, 0]
    full = block_mask.full_kv_indices[0, 0], block_mask.full_kv_num_blocks[0, 0]
    for i in range(lq // q_block):
        rows = slice(i * q_block, (i + 1) * q_block)
        listed_partial = set(partial[0][i, : partial[1][i]].tolist())
        listed_full = set(full[0][i, : full[1][i]].tolist())
        assert not listed_partial & listed_full
        for j in listed_partial:
            out[rows, j * kv_block : (j + 1) * kv_block] = token[rows, j * kv_block : (j + 1) * kv_block]
        for j in listed_full:
            out[rows, j * kv_block : (j + 1) * kv_block] = True
    return out


@pytest.mark.parametrize(
    ("grid", "radius", "frames_radius", "num_global", "tile"),
    [
        ((40, 50), 7.5, None, 0, None),
        ((40, 50), 7.5, None, 77, (16, 8)),
        ((32, 32), 12, None, 256, None),
        ((24, 24), 0, None, 1, None),
        ((10, 12), 100, None, 3, None),
        ((3, 16), 1.5, None, 0, (2, 64)),
        ((6, 20, 20), 3, None, 5, None),
        ((5, 16, 16), 2.5, None, 0, (4, 4, 8)),
        # Cylinders: every frame, a few frames, the query's frame only, one-frame tiles.
        ((6, 20, 20), 3, math.inf, 5, None),
        ((9, 16, 24), 4.5, 2, 0, None),
        ((5, 16, 16), 2.5, 0, 0, (4, 4, 8)),
        ((7, 12, 20), 2, 1, 3, (1, 8, 16)),
        ((10, 8, 8), 20, 3.7, 0, (8, 4, 4)),
    ],
)
def test_block_mask_structure_matches_dense_mask(grid, radius, frames_radius, num_global, tile):
    """Every pair the dense mask needs is in a listed block, and full blocks are really full."""
    grid3 = as_grid3(grid)
    window = window_geometry(radius, frames_radius, grid3)
    tile3 = choose_tile(grid3, window) if tile is None else as_grid3(tile)
    plan = build_plan(grid3, window, tile3, num_global, CPU)
    layout = TileLayout(grid3, tile3)
    gather, _, _, valid = tile_order(layout)

    dense = window_mask(grid, radius, frames_radius=frames_radius)[gather][:, gather] & valid[None, :]
    global_cols = torch.arange(plan.global_padded) < num_global
    expected = torch.cat([dense, global_cols.expand(len(gather), -1)], dim=1)
    got = kernel_mask(plan.block_mask)
    assert torch.equal(got[valid], expected[valid])

    # Listed partial blocks of grid keys are never empty where no padding is involved.
    if all(g % t == 0 for g, t in zip(grid3, tile3, strict=True)):
        num, idx, _, _ = block_structure(layout, window)
        block = layout.block_size
        for i in range(layout.num_blocks):
            for j in idx[i, : num[i]].tolist():
                assert dense[i * block : (i + 1) * block, j * block : (j + 1) * block].any()


def test_tiling_order_and_counts():
    layout = TileLayout((3, 10, 13), (2, 8, 8))
    gather, scatter, coords, valid = tile_order(layout)
    assert torch.equal(gather[scatter], torch.arange(layout.num_tokens))
    assert int(valid.sum()) == layout.num_tokens and len(gather) == layout.num_padded
    assert torch.equal(
        coords[scatter],
        torch.stack(torch.meshgrid(*map(torch.arange, (3, 10, 13)), indexing="ij"), -1).reshape(-1, 3),
    )
    for grid, radius, frames_radius in [
        ((1, 64, 64), 8, None),
        ((1, 48, 80), 5.5, None),
        ((4, 32, 32), 3, None),
        ((4, 32, 32), 3, math.inf),
        ((8, 24, 40), 5, 1),
    ]:
        window = window_geometry(radius, frames_radius, grid)
        tile = choose_tile(grid, window)
        assert math.prod(tile) == BLOCK_SIZE and (grid[0] > 1 or tile[0] == 1)
        num, _, full_num, _ = block_structure(TileLayout(grid, tile), window)
        assert int(num.sum() + full_num.sum()) == sum(count_blocks(grid, tile, window))
    # Compact tiles beat row-major blocks (two 64-token rows) on a 64 x 64 grid.
    window = window_geometry(8, None, (1, 64, 64))
    assert sum(count_blocks((1, 64, 64), choose_tile((1, 64, 64), window), window)) < sum(
        count_blocks((1, 64, 64), (1, 2, 64), window)
    )
    # A cylinder over every frame is one block column per key tile of the frame: 3D tiles beat
    # row-major strips of one frame.
    grid = (21, 30, 52)
    window = window_geometry(math.sqrt(63), math.inf, grid)
    assert sum(count_blocks(grid, choose_tile(grid, window), window)) < sum(
        count_blocks(grid, (1, 1, 128), window)
    )


def test_radius_threshold_is_exact_at_integer_distances():
    assert radius_threshold(math.sqrt(2), (1, 5, 5)) == 2
    assert radius_threshold(1.4142, (1, 5, 5)) == 1
    assert radius_threshold(math.sqrt(5), (1, 5, 5)) == 5
    assert radius_threshold(1e9, (2, 3, 4)) == radius_threshold(math.inf, (2, 3, 4)) == 1 + 4 + 9
    mask = window_mask((5, 5), 0)
    assert torch.equal(mask, torch.eye(25, dtype=torch.bool))


def test_window_geometry_of_cylinders():
    """A cylinder's threshold is clipped to a frame's diagonal, its frames to the clip; one frame is the ball."""
    assert window_geometry(2, None, (3, 4, 5)) == Window(4)
    assert window_geometry(2, 1, (3, 4, 5)) == Window(4, 1)
    assert window_geometry(100, 1.999, (3, 4, 5)) == Window(9 + 16, 1)
    assert window_geometry(2, 2 - 1e-9, (9, 4, 5)) == Window(4, 2)  # a hair below an integer counts as it
    assert window_geometry(2, 7, (3, 4, 5)) == window_geometry(2, math.inf, (3, 4, 5)) == Window(4, 2)
    assert window_geometry(2, 0, (1, 4, 5)) == window_geometry(2, math.inf, as_grid3((4, 5))) == Window(4)
    assert (
        Window(4, 2).reach == (2, 2, 2) and Window(10, 0).reach == (0, 3, 3) and Window(10).reach == (3, 3, 3)
    )
    # |dt| <= frames and a disc in each frame; the ball counts dt in its distance.
    mask = window_mask((3, 2, 2), 1, frames_radius=1).view(3, 4, 3, 4)
    assert mask[0, 0, 1].tolist() == [True, True, True, False] and not mask[0, 0, 2].any()
    assert window_mask((3, 2, 2), 1).view(3, 4, 3, 4)[0, 0, 1].tolist() == [True, False, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_dtypes(dtype, backend):
    grid = (6, 9)
    q, k, v, global_kv = make_inputs(grid, 2, "bnhd", batch=1, heads=2, dim=16, dtype=dtype)
    ref = local_attention_reference(
        *(t.float() for t in (q, k, v)), grid, 2.2, tuple(t.float() for t in global_kv)
    )
    out = local_attention(q, k, v, grid=grid, radius=2.2, global_kv=global_kv, backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize(
    ("grid", "radius", "frames_radius", "num_global", "budget"),
    [
        ((7, 9), 2, None, 3, 1 << 24),
        ((7, 9), 2, None, 3, 200),
        ((3, 4, 5), 1.5, None, 0, 1),
        ((4, 4, 5), 1.5, 1, 2, 1 << 24),
    ],
)
def test_chunked_gradients_match_reference(grid, radius, frames_radius, num_global, budget, layout, fused):
    """float64 gradients of the output and the lse, on the fused kernel and the einsum path."""
    inputs = make_inputs(grid, num_global, layout, batch=2, heads=2, dim=6, dim_v=4, dtype=torch.float64)
    q, k, v, global_kv = inputs
    leaves = [q, k, v, *(global_kv or ())]
    for t in leaves:
        t.requires_grad_(True)
    grid3 = as_grid3(grid)
    window = window_geometry(radius, frames_radius, grid3)
    out, lse = local_attention_chunked(
        q, k, v, grid3, window, global_kv, 0.3, layout, return_lse=True, budget=budget, fused=fused
    )
    ref, ref_lse = local_attention_reference(
        q, k, v, grid, radius, global_kv, layout, 0.3, return_lse=True, frames_radius=frames_radius
    )
    grad_out, grad_lse = torch.randn_like(ref), torch.randn_like(ref_lse)
    got = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), leaves)
    want = torch.autograd.grad((ref * grad_out).sum() + (ref_lse * grad_lse).sum(), leaves)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-10


@pytest.mark.parametrize(
    ("dtype", "dim", "dim_v", "loss"),
    [
        (torch.float32, 8, 8, "out"),
        (torch.float32, 4, 7, "lse"),
        (torch.float32, 8, 5, "both"),
        (torch.bfloat16, 16, 16, "both"),
    ],
)
def test_fused_gradients_in_lower_precision(dtype, dim, dim_v, loss):
    """The fused kernel's backward (computed in float32) for either output alone, and value widths
    above and below the query width (padded for the kernel)."""
    grid = (9, 11)
    q, k, v, (k_g, v_g) = make_inputs(grid, 3, batch=1, heads=2, dim=dim, dim_v=dim_v, dtype=dtype)
    leaves = [t.requires_grad_(True) for t in (q, k, v, k_g, v_g)]
    out, lse = local_attention(q, k, v, grid=grid, radius=2.5, global_kv=(k_g, v_g), return_lse=True)
    floats = [t.detach().float().requires_grad_(True) for t in leaves]
    ref, ref_lse = local_attention_reference(*floats[:3], grid, 2.5, tuple(floats[3:]), return_lse=True)
    grad_out, grad_lse = torch.randn_like(ref), torch.randn_like(ref_lse)

    def objective(o, s):
        terms = {"out": (o.float() * grad_out).sum(), "lse": (s * grad_lse).sum()}
        return terms[loss] if loss in terms else terms["out"] + terms["lse"]

    got = torch.autograd.grad(objective(out, lse), leaves)
    # The lse does not depend on the values: their gradients are zero.
    want = torch.autograd.grad(objective(ref, ref_lse), floats, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert loss == "lse" and not g.any()
        else:
            assert g.dtype == dtype and rel_err(g, w) < 5 * TOL[dtype]


def test_chunked_runs_the_einsum_path_without_the_fused_kernel(monkeypatch):
    """Where torch lacks the fused CPU kernel, the einsum path runs (same result); ``fused=True`` raises."""
    package = importlib.import_module("lindiff.kernels.local_attention.chunked")
    calls = []
    einsum = package._einsum_attention
    monkeypatch.setattr(package, "fused_available", lambda: False)
    monkeypatch.setattr(package, "_einsum_attention", lambda *a: calls.append(1) or einsum(*a))
    grid = (6, 7)
    q, k, v, global_kv = make_inputs(grid, 2)
    out = local_attention(q, k, v, grid=grid, radius=2, global_kv=global_kv)
    assert calls and rel_err(out, local_attention_reference(q, k, v, grid, 2, global_kv)) < TOL[torch.float32]
    grid3 = as_grid3(grid)
    with pytest.raises(ValueError, match="fused=True needs CPU tensors"):
        local_attention_chunked(q, k, v, grid3, window_geometry(2, None, grid3), None, 0.5, fused=True)


@pytest.mark.parametrize(
    ("grid", "radius", "frames_radius", "num_global", "budget"),
    [
        ((1, 64, 64), 15.97, None, 0, 1 << 24),
        ((1, 128, 128), 15.97, None, 300, 1 << 24),
        ((1, 64, 64), 15.97, None, 300, 50_000),
        ((21, 30, 52), 7.9, math.inf, 0, 1 << 24),
        ((21, 30, 52), 7.9, 2, 77, 1 << 20),
        ((3, 4, 5), 1, None, 0, 1),
    ],
)
def test_fused_box_keeps_its_mask_in_the_budget(grid, radius, frames_radius, num_global, budget):
    window = window_geometry(radius, frames_radius, grid)
    box = choose_fused_box(grid, window, num_global, budget)
    keys = math.prod(min(g, s + 2 * r) for g, s, r in zip(grid, box, window.reach, strict=True))
    assert all(1 <= s <= g for s, g in zip(box, grid, strict=True))
    assert math.prod(box) * (keys + num_global) <= budget or box == (1, 1, 1)


def test_return_lse_merges_window_and_global_parts():
    """Window-only and global-only attentions, merged through their lse, equal the joint softmax."""
    grid = (8, 10)
    q, k, v, (k_g, v_g) = make_inputs(grid, 5, "bnhd")
    joint, joint_lse = local_attention(q, k, v, grid=grid, radius=2, global_kv=(k_g, v_g), return_lse=True)
    window, window_lse = local_attention(q, k, v, grid=grid, radius=2, return_lse=True)
    scores = torch.einsum("bnhd,bmhd->bnhm", q, k_g) * q.shape[-1] ** -0.5
    glob = torch.einsum("bnhm,bmhe->bnhe", scores.softmax(-1), v_g)
    merged, merged_lse = merge_attention_states([window, glob], [window_lse, scores.logsumexp(-1)])
    assert rel_err(merged, joint) < 1e-5 and rel_err(merged_lse, joint_lse) < 1e-6

    # A part in which a query saw no key (lse = -inf) is ignored, even with a NaN output.
    empty = torch.full_like(window, math.nan)
    again, again_lse = merge_attention_states(
        [window, empty], [window_lse, torch.full_like(window_lse, -math.inf)]
    )
    assert torch.equal(again, window) and torch.equal(again_lse, window_lse)
    with pytest.raises(ValueError, match="lse"):
        merge_attention_states([window], [window_lse[..., 0]])


def test_plan_cache_alternates_resolutions(monkeypatch):
    monkeypatch.delenv(flex.PLAN_CACHE_ENV, raising=False)
    clear_plan_cache()
    small, large = (1, 5, 7), (1, 12, 12)
    for _ in range(3):
        for grid in (small, large):
            plan = get_plan(grid, Window(2), choose_tile(grid, Window(2)), 0, CPU)
            assert len(plan.scatter) == math.prod(grid)
    info = plan_cache_info()
    assert (info.misses, info.hits, info.currsize) == (2, 4, 2)
    assert info.max_bytes == flex.PLAN_CACHE_MB << 20 and info.nbytes > 0

    # The public function goes through the same cache; the second call at a geometry is a hit.
    clear_plan_cache()
    q, k, v, _ = make_inputs((4, 6), batch=1, heads=1)
    first = local_attention(q, k, v, grid=(4, 6), radius=1, backend="flex")
    second = local_attention(q, k, v, grid=(4, 6), radius=1.2, backend="flex")  # same integer threshold
    assert torch.equal(first, second)
    assert (plan_cache_info().misses, plan_cache_info().hits) == (1, 1)


def test_plan_cache_is_bounded_by_bytes(monkeypatch):
    """Plans are evicted least recently used first while their bytes exceed the budget."""
    clear_plan_cache()
    grids = [(1, 16, 16 * i) for i in (1, 2, 3)]
    sizes = [build_plan(g, Window(4), (1, 8, 16), 0, CPU).nbytes for g in grids]
    assert sizes[0] < sizes[1] < sizes[2]
    # A budget for the two smaller plans: the third evicts the least recently used one.
    monkeypatch.setenv(flex.PLAN_CACHE_ENV, str((sizes[0] + sizes[1]) / 2**20))
    get_plan(grids[0], Window(4), (1, 8, 16), 0, CPU)
    get_plan(grids[1], Window(4), (1, 8, 16), 0, CPU)
    get_plan(grids[0], Window(4), (1, 8, 16), 0, CPU)  # now grids[1] is the least recently used
    assert plan_cache_info()[:4] == (1, 2, 2, sizes[0] + sizes[1])
    get_plan(grids[2], Window(4), (1, 8, 16), 0, CPU)  # too big beside either: it stays alone
    assert plan_cache_info()[2:4] == (1, sizes[2])
    get_plan(grids[0], Window(4), (1, 8, 16), 0, CPU)  # rebuilt; the larger one is evicted
    assert plan_cache_info()[1:4] == (4, 1, sizes[0])
    # Budget 0 still keeps the plan in use.
    monkeypatch.setenv(flex.PLAN_CACHE_ENV, "0")
    get_plan(grids[1], Window(4), (1, 8, 16), 0, CPU)
    assert plan_cache_info()[2:] == (1, sizes[1], 0)
    monkeypatch.setenv(flex.PLAN_CACHE_ENV, "a lot")
    with pytest.raises(
        ValueError, match=r"LINDIFF_FLEX_PLAN_CACHE_MB must be a number of MiB >= 0, got 'a lot'"
    ):
        get_plan(grids[2], Window(4), (1, 8, 16), 0, CPU)
    monkeypatch.delenv(flex.PLAN_CACHE_ENV)
    clear_plan_cache()
    assert plan_cache_info()[:4] == (0, 0, 0, 0)


def test_plan_bytes_count_every_tensor():
    """The dense block indices dominate: about 4 bytes x (query blocks) x (key blocks) x 4 index tensors."""
    plan = build_plan((1, 64, 64), Window(16 * 16), (1, 8, 16), 77, CPU)
    blocks = 64 * 64 // 128
    width = blocks + 1  # one (padded) block of global tokens
    assert plan.nbytes >= 4 * 2 * blocks * width * 4
    assert plan.padding.numel() == 0 and plan.num_padded == 64 * 64


def test_tile_major_buffers_match_a_gather():
    """q, k, v are written once into one buffer: image tokens, global tokens, zero padding."""
    grid, tile = (1, 10, 13), (1, 8, 16)
    plan = build_plan(grid, Window(4), tile, 5, CPU)
    for layout, token_dim in (("bnhd", 1), ("bhnd", 2)):
        x, _, _, (k_g, _) = make_inputs(grid[1:], 5, layout, batch=2, heads=3)
        pad = plan.global_padded - 5
        got = flex._to_tiles(x, plan, token_dim, k_g, pad)
        bhnd = (lambda t: t.transpose(1, 2)) if layout == "bnhd" else (lambda t: t)
        valid = torch.ones(plan.num_padded, dtype=torch.bool)
        valid[plan.padding] = False
        want = bhnd(x).index_select(2, plan.gather) * valid[:, None]
        zeros = torch.zeros(2, 3, pad, 8)
        assert torch.equal(got, torch.cat([want, bhnd(k_g), zeros], dim=2))
        assert plan.padding.numel() == plan.num_padded - math.prod(grid)


def test_plan_lookup_stays_out_of_a_users_compile():
    """Dynamo runs the cache lookup eagerly (``torch.compiler.disable``): hits are counted every call."""
    torch._dynamo.reset()
    clear_plan_cache()

    def layer(q, k, v):
        return local_attention(q, k, v, grid=(6, 8), radius=2, backend="flex") * 2.0

    compiled = torch.compile(layer, backend="eager")
    q, k, v, _ = make_inputs((6, 8), batch=1, heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(3):
            torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))
    assert (plan_cache_info().misses, plan_cache_info().hits) == (1, 5)
    assert get_plan._torchdynamo_disable
    torch._dynamo.reset()


def test_recompile_limit_warns_and_runs_the_chunked_path(monkeypatch):
    """Past Dynamo's recompile limit compiled FlexAttention would build N x N scores: warn, run chunked."""
    torch._dynamo.reset()
    eager_compiled = torch.compile(flex._flex_api()[0], backend="eager", dynamic=False, fullgraph=True)
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: eager_compiled)
    monkeypatch.setattr(flex, "RECOMPILE_LIMIT", 1)
    package = importlib.import_module("lindiff.kernels.local_attention")
    monkeypatch.setattr(
        package, "local_attention_flex", functools.partial(local_attention_flex, compiled=True)
    )
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for grid in ((4, 6), (12, 20)):  # one block of tokens, then three: a recompilation
            q, k, v, _ = make_inputs(grid, batch=1, heads=2)
            if grid == (12, 20):
                grid3 = as_grid3(grid)
                window = window_geometry(1.5, None, grid3)
                with pytest.raises(flex.RecompileLimitError, match="recompile limit"):
                    local_attention_flex(
                        q, k, v, grid3, window, choose_tile(grid3, window), None, 0.3, compiled=True
                    )
            out = local_attention(q, k, v, grid=grid, radius=1.5, backend="flex")
            assert rel_err(out, local_attention_reference(q, k, v, grid, 1.5)) < TOL[torch.float32]
    limit_warnings = [
        w for w in caught if issubclass(w.category, RuntimeWarning) and "recompile" in str(w.message)
    ]
    assert len(limit_warnings) == 1 and "chunked path for grid (12, 20)" in str(limit_warnings[0].message)
    torch._dynamo.reset()


def bad_call(**changes):
    q, k, v, global_kv = make_inputs((4, 5), 2)
    args = {"q": q, "k": k, "v": v, "grid": (4, 5), "radius": 1, "global_kv": global_kv}
    args.update(changes)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return local_attention(q, k, v, **args)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"layout": "nhd"}, ValueError, r"layout must be one of \('bnhd', 'bhnd'\), got 'nhd'"),
        (
            {"backend": "triton"},
            ValueError,
            r"backend must be one of \('auto', 'flex', 'chunked'\), got 'triton'",
        ),
        ({"grid": (4, 4)}, ValueError, r"grid \(4, 4\) has 16 cells but q, k, v have 20 tokens"),
        ({"grid": (20,)}, ValueError, r"grid must be \(H, W\) or \(T, H, W\) of positive ints, got \(20,\)"),
        ({"grid": (4.0, 5)}, ValueError, "grid must be"),
        ({"radius": -1}, ValueError, "radius must be a number >= 0"),
        ({"radius": math.nan}, ValueError, "radius must be a number >= 0"),
        ({"radius": "3"}, ValueError, "radius must be a number >= 0"),
        (
            {"frames_radius": -1},
            ValueError,
            r"frames_radius must be None \(a ball .*\) or a number >= 0.*got -1",
        ),
        ({"frames_radius": math.nan}, ValueError, "frames_radius must be None"),
        ({"frames_radius": True}, ValueError, "frames_radius must be None"),
        ({"frames_radius": "2"}, ValueError, "frames_radius must be None.*got '2'"),
        ({"scale": 0}, ValueError, "scale must be a positive finite number or None"),
        ({"tile": (8, 8)}, ValueError, "tile must be 2 positive ints .* multiple of 128"),
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
        ({"q": torch.randn(2, 20, 3)}, ValueError, r"q must be 4-D \('bnhd' layout\)"),
        ({"k": torch.randn(2, 21, 3, 8)}, ValueError, "k must have q's batch, tokens and heads"),
        ({"v": torch.randn(2, 20, 3, 8).half()}, TypeError, "q, k, v must share a dtype"),
        ({"q": torch.randn(2, 20, 3, 4)}, ValueError, "q and k head dims differ: 4 vs 8"),
        ({"q": [1.0]}, TypeError, "q must be a torch.Tensor, got list"),
        ({"global_kv": torch.randn(2, 2, 3, 8)}, TypeError, r"global_kv must be a pair \(k_g, v_g\) or None"),
        (
            {"global_kv": (torch.randn(2, 2, 3, 8), torch.randn(2, 3, 3, 8))},
            ValueError,
            "global_kv token counts differ",
        ),
        (
            {"global_kv": (torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))},
            ValueError,
            r"global_kv\[0\] \(k_g\) must have q's batch 2 and heads 3",
        ),
    ],
)
def test_validation_errors(changes, error, match):
    with pytest.raises(error, match=match):
        bad_call(**changes)


def test_integer_dtype_is_rejected():
    q = torch.ones(1, 4, 1, 2, dtype=torch.int64)
    with pytest.raises(
        TypeError, match=r"q, k, v must be float32, float16, bfloat16 or float64, got torch\.int64"
    ):
        local_attention(q, q, q, grid=(2, 2), radius=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_global", [0, 77])
def test_compiled_flex_matches_reference_on_cuda(dtype, num_global):
    grid, radius = (64, 64), 16
    q, k, v, global_kv = make_inputs(grid, num_global, "bnhd", batch=1, heads=4, dim=64, dtype=dtype)
    q, k, v = (t.cuda() for t in (q, k, v))
    global_kv = None if global_kv is None else tuple(t.cuda() for t in global_kv)
    ref, ref_lse = local_attention_reference(q, k, v, grid, radius, global_kv, return_lse=True)
    out, lse = local_attention(q, k, v, grid=grid, radius=radius, global_kv=global_kv, return_lse=True)
    assert out.dtype == dtype and rel_err(out, ref) < 5 * TOL[dtype]
    assert rel_err(lse, ref_lse) < 1e-3


@pytest.mark.gpu
def test_compiled_flex_gradients_on_cuda():
    grid, radius = (32, 40), 6.5
    inputs = make_inputs(grid, 9, "bhnd", batch=1, heads=2, dim=64, dtype=torch.float32)
    leaves = [t.cuda().requires_grad_(True) for t in (*inputs[:3], *inputs[3])]
    q, k, v, k_g, v_g = leaves
    out = local_attention(
        q, k, v, grid=grid, radius=radius, global_kv=(k_g, v_g), layout="bhnd", backend="flex"
    )
    ref = local_attention_reference(q, k, v, grid, radius, (k_g, v_g), "bhnd")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad((out * grad).sum(), leaves)
    want = torch.autograd.grad((ref * grad).sum(), leaves)
    assert rel_err(out, ref) < 1e-4
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_compiled_flex_on_a_padded_grid_on_cuda(layout):
    """A grid that is no multiple of the tile (padded cells zeroed) and 77 text tokens, bf16."""
    grid, radius = (45, 61), 8
    inputs = make_inputs(grid, 77, layout, batch=2, heads=4, dim=64, dtype=torch.bfloat16)
    q, k, v, k_g, v_g = (t.cuda() for t in (*inputs[:3], *inputs[3]))
    out, lse = local_attention(
        q, k, v, grid=grid, radius=radius, global_kv=(k_g, v_g), layout=layout, return_lse=True
    )
    ref, ref_lse = local_attention_reference(q, k, v, grid, radius, (k_g, v_g), layout, return_lse=True)
    assert out.is_contiguous() and lse.is_contiguous() and out.shape == ref.shape
    assert rel_err(out, ref) < 5 * TOL[torch.bfloat16] and rel_err(lse, ref_lse) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("frames_radius", [None, 2, math.inf])
def test_compiled_flex_on_a_video_grid_on_cuda(frames_radius):
    """A ball and cylinders on a padded (T, H, W) grid with 3-D tiles and 77 text tokens, bf16."""
    grid, radius = (7, 20, 26), 5.5
    inputs = make_inputs(grid, 77, "bnhd", batch=1, heads=4, dim=64, dtype=torch.bfloat16)
    q, k, v, k_g, v_g = (t.cuda() for t in (*inputs[:3], *inputs[3]))
    window = {"radius": radius, "frames_radius": frames_radius}
    out, lse = local_attention(q, k, v, grid=grid, global_kv=(k_g, v_g), return_lse=True, **window)
    ref, ref_lse = local_attention_reference(
        q, k, v, grid, radius, (k_g, v_g), return_lse=True, frames_radius=frames_radius
    )
    assert rel_err(out, ref) < 5 * TOL[torch.bfloat16] and rel_err(lse, ref_lse) < 1e-3


@pytest.mark.gpu
def test_users_compile_of_a_layer_on_cuda():
    """Inductor compiles the caller's graph around the (eager) plan lookup and FlexAttention."""
    grid = (32, 48)

    def layer(q, k, v):
        return local_attention(q, k, v, grid=grid, radius=6, backend="flex").flatten(2) * 2.0

    q, k, v, _ = make_inputs(grid, batch=1, heads=4, dim=64, dtype=torch.float16)
    q, k, v = (t.cuda() for t in (q, k, v))
    torch.testing.assert_close(torch.compile(layer)(q, k, v), layer(q, k, v), rtol=2e-3, atol=2e-3)
