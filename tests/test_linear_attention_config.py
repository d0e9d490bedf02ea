"""Launch configuration of the linear-attention kernels: tiles, splits, dot operands, env overrides.

Plain Python (``config.py`` imports no Triton): the plans an H100 (132 SMs) would get are
checked here without one.
"""

import pytest
import torch

from lindiff.kernels.linear_attention import config
from lindiff.kernels.linear_attention.config import (
    MIN_STATE_BLOCK,
    PARTIAL_RATIO,
    Overrides,
    Problem,
    backward_plan,
    dot_operands,
    env_overrides,
    forward_plan,
    head_tile,
)

H100_SMS = 132
# name -> (B * H, tokens, D, D_v): joint image + text attention of FLUX (24 heads x 128; 512
# text tokens) at 1024, 2048 and 4096 px; SDXL's 64 x 64 and 32 x 32 levels at 1024 px
# (batch 2 for guidance) and its 64-dim level at 4096 px; SD 1.5's first level at 4096 px.
SHAPES = {
    "flux-1k": (24, 4096 + 512, 128, 128),
    "flux-2k": (24, 16384 + 512, 128, 128),
    "flux-4k": (24, 65536 + 512, 128, 128),
    "sdxl-1k-64": (20, 4096, 64, 64),
    "sdxl-1k-32": (40, 1024, 64, 64),
    "sdxl-4k-64": (20, 65536, 64, 64),
    "sd15-4k": (16, 262144, 40, 40),
}


def problem(heads, tokens, dim, dim_v, dtype=torch.bfloat16):
    return Problem(heads, tokens, tokens, dim, dim_v, dtype, "cuda", H100_SMS)


def partial_fraction(p: Problem, splits: int) -> float:
    """Bytes of the partial states (written, then read by the reduction) over the key/value bytes."""
    return 8 * p.dim * p.dim_v * splits / (p.n_k * (p.dim + p.dim_v) * p.dtype.itemsize)


@pytest.mark.parametrize(
    ("dtype", "token", "state", "precision"),
    [
        (torch.bfloat16, "bf16", "bf16", "tf32"),
        (torch.float16, "fp16", "fp32", "tf32"),  # the state can exceed 65504: TF32 against it
        (torch.float32, "fp32", "fp32", "ieee"),
    ],
)
def test_dot_operands_follow_the_input_dtype(dtype, token, state, precision):
    ops = dot_operands(dtype, "cuda")
    assert (ops.token, ops.state, ops.precision, ops.emulate) == (token, state, precision, False)
    assert dot_operands(dtype, "cpu").emulate  # the interpreter rounds, then multiplies in float32
    assert forward_plan(problem(2, 100, 64, 64, dtype)).operands == ops
    assert backward_plan(problem(2, 100, 64, 64, dtype)).operands == ops


@pytest.mark.parametrize(
    ("dim", "dim_v", "block_d", "num_d", "block_dv", "num_e"),
    [
        (40, 40, 64, 1, 64, 1),  # one masked tile: the bound 40 is a constant (8-wide vectors)
        (64, 64, 64, 1, 64, 1),  # even: no mask at all
        (80, 80, 128, 1, 128, 1),
        (128, 128, 128, 1, 128, 1),
        (160, 160, 32, 5, 32, 5),  # five tiles of 32, not one of 256
        (40, 160, 64, 1, 32, 5),
    ],
)
def test_head_dim_tiles(dim, dim_v, block_d, num_d, block_dv, num_e):
    """The output pass's tiles (the state pass may tile finer to fill the GPU)."""
    assert head_tile(dim) == block_d and head_tile(dim_v) == block_dv
    out = forward_plan(problem(1024, 4096, dim, dim_v)).output  # enough heads: no shrinking
    assert (out.block_d, out.num_d, out.block_dv, out.num_e) == (block_d, num_d, block_dv, num_e)
    assert out.num_d * out.block_d >= dim and out.num_e * out.block_dv >= dim_v
    # The backward holds the whole head dim in one tile and tiles the value dim.
    query = backward_plan(problem(1024, 4096, dim, dim_v)).query
    assert query.num_d == 1 and query.block_d >= dim and query.num_e * query.block_dv >= dim_v


def test_head_tile_pads_least():
    assert [head_tile(d) for d in (8, 16, 24, 72, 96, 192, 256, 320)] == [16, 16, 32, 128, 128, 64, 128, 64]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_state_splits_bound_partial_traffic_and_fill_the_gpu(name):
    p = problem(*SHAPES[name])
    st = forward_plan(p).state
    tiles = -(-p.n_k // st.block_n)
    assert st.splits * st.tiles_per_split >= tiles > (st.splits - 1) * st.tiles_per_split
    assert st.splits == 1 or partial_fraction(p, st.splits) <= 1 / PARTIAL_RATIO
    programs = p.heads * st.splits * st.num_d * st.num_e
    assert programs >= p.target or min(st.block_d, st.block_dv) == MIN_STATE_BLOCK
    assert min(st.block_d, st.block_dv) >= MIN_STATE_BLOCK
    # No partial states in the output pass: as many slices as fill the GPU (up to rounding).
    out = forward_plan(p).output
    tiles = -(-p.n_q // out.block_n)
    wanted = min(tiles, -(-p.target // (p.heads * out.num_e)))
    assert out.tiles_per_split == -(-tiles // wanted)


@pytest.mark.parametrize(
    ("name", "splits", "block_d", "block_dv"),
    [
        ("flux-1k", 3, 64, 64),  # was 11 splits of one 128 x 128 tile: 69% extra traffic
        ("flux-4k", 11, 128, 128),
        ("sdxl-1k-64", 7, 64, 32),
        ("sdxl-1k-32", 2, 32, 32),
        ("sd15-4k", 17, 64, 64),
    ],
)
def test_state_plans_at_model_shapes(name, splits, block_d, block_dv):
    st = forward_plan(problem(*SHAPES[name])).state
    assert (st.splits, st.block_d, st.block_dv) == (splits, block_d, block_dv)


def test_backward_query_pass_bounds_partial_traffic():
    for name in SHAPES:
        p = problem(*SHAPES[name])
        query = backward_plan(p).query
        assert query.splits == 1 or partial_fraction(p, query.splits) <= 1 / PARTIAL_RATIO
        assert query.num_d == 1 and query.block_dv >= MIN_STATE_BLOCK


def test_tiny_and_empty_sequences():
    for n in (0, 1, 31, 129):
        for plan in (forward_plan(problem(2, n, 64, 64)), backward_plan(problem(2, n, 64, 64))):
            for launch in (getattr(plan, f) for f in plan.__dataclass_fields__ if f != "operands"):
                assert launch.splits >= 1 and launch.tiles_per_split >= 1
                assert launch.splits * launch.tiles_per_split * launch.block_n >= n


def test_env_overrides(monkeypatch):
    names = [name for name, _ in config.OVERRIDES.values()]
    for name in names:
        monkeypatch.delenv(name, raising=False)
    assert env_overrides() == Overrides()
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_D", "32")
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_DV", "64")
    monkeypatch.setenv("LINDIFF_LINEAR_BLOCK_N", "16")
    monkeypatch.setenv("LINDIFF_LINEAR_NUM_WARPS", "2")
    monkeypatch.setenv("LINDIFF_LINEAR_NUM_STAGES", " 1 ")
    o = env_overrides()
    assert o == Overrides(block_d=32, block_dv=64, block_n=16, num_warps=2, num_stages=1)

    p = problem(24, 4096, 160, 160)
    fwd, bwd = forward_plan(p, o), backward_plan(p, o)
    for launch in (fwd.state, fwd.output):
        assert (launch.block_n, launch.block_d, launch.block_dv) == (16, 32, 64)
        assert (launch.num_d, launch.num_e, launch.num_warps, launch.num_stages) == (5, 3, 2, 1)
    for launch in (bwd.query, bwd.key):  # the backward keeps one head-dim tile
        assert (launch.block_n, launch.block_d, launch.block_dv, launch.num_stages) == (16, 256, 64, 1)
    # A fixed tile is not shrunk to fill the GPU.
    few = forward_plan(problem(1, 64, 128, 128), Overrides(block_d=128, block_dv=128)).state
    assert (few.block_d, few.block_dv) == (128, 128)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LINDIFF_LINEAR_BLOCK_D", "48"),
        ("LINDIFF_LINEAR_BLOCK_DV", "512"),
        ("LINDIFF_LINEAR_BLOCK_N", "sixty-four"),
        ("LINDIFF_LINEAR_NUM_WARPS", "3"),
        ("LINDIFF_LINEAR_NUM_STAGES", "0"),
    ],
)
def test_env_override_errors_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name} must be one of .*; got '{value}'"):
        env_overrides()


def test_grid_limit_on_heads():
    with pytest.raises(ValueError, match="batch \\* heads must be at most 65535"):
        problem(65536, 16, 32, 32)


def test_backward_stages_fit_shared_memory():
    """sm_90 builds of the backward need 254 KiB (D = 128, fp16) and 438 KiB (D = 160) of shared
    memory at 3 stages, past an H100's 227 KiB: fewer stages for larger head-dim tiles."""
    stages = {
        d: backward_plan(problem(24, 4096, d, d, torch.float16)).query.num_stages for d in (40, 64, 128, 160)
    }
    assert stages == {40: 3, 64: 3, 128: 2, 160: 1}
    assert forward_plan(problem(24, 4096, 160, 160)).output.num_stages == config.DEFAULT_NUM_STAGES
