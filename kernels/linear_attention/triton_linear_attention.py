"""Fused Triton kernels of non-causal linear attention (forward and backward) and their launchers.

Import this module only where Triton is installed (``autograd.py`` imports it lazily, at the
first call). Every kernel reads its inputs through ``(batch, head, token, dim)`` strides, so both
layouts and strided views run without copies; tiles are cast to float32 right after ``tl.load``
and all sums accumulate in float32.

Forward (``o_i = phi(q_i) S / (phi(q_i) . z + eps)``):
    1. ``_state_partials_kernel``, grid ``(B*H, SPLITS, E)``: each program walks its slice of the
       keys in ``BLOCK_N`` tiles and writes a partial ``s * [S | z]`` to a workspace.
    2. ``sum`` over the split axis in a fixed order (deterministic, no atomics).
    3. ``_output_kernel``, grid ``(B*H, SPLITS, E)``: query tiles, division in the epilogue.

Backward, with ``p = phi(q)``, ``den_i = p_i . z + eps``, ``t_i = dO_i S^T``,
``g_i = dO_i . o_i / den_i = (p_i . t_i) / den_i^2``:
    1. ``_query_grad_kernel``: ``dq_i = (t_i / den_i - g_i z) * phi'(q_i)`` and partials of
       ``A = s * sum_i p_i^T dO_i / den_i`` and ``c = s * sum_i g_i p_i``.
    2. ``sum`` over the split axis.
    3. ``_key_grad_kernel``: ``dv_j = phi(k_j) A`` and ``dk_j = (v_j A^T - c) * phi'(k_j)``.

``E`` tiles the value dim when a full ``D x D_v`` float32 state would not fit in registers;
programs of one ``(head, split)`` then share the key/query tiles and each owns ``BLOCK_DV``
columns of the state.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Programs launched per streaming multiprocessor by the split passes.
PROGRAMS_PER_SM = 2
# Largest float32 state tile (BLOCK_D x BLOCK_DV) one program keeps in registers.
MAX_STATE_TILE = 128 * 128
# Without a GPU (the interpreter) there is no SM count; a few programs per head still exercise
# the split reduction.
INTERPRETER_SMS = 4


@triton.jit
def _phi(x, FEATURE_MAP: tl.constexpr):
    if FEATURE_MAP == "elu1":
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE_MAP == "relu":
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def _dphi(x, FEATURE_MAP: tl.constexpr):
    if FEATURE_MAP == "elu1":
        y = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE_MAP == "relu":
        y = tl.where(x > 0, 1.0, 0.0)
    else:
        y = tl.full(x.shape, 1.0, tl.float32)
    return y


@triton.jit
def _first_only(d, pid_e):
    """``d`` for the programs that own value block 0, else 0: a bound that masks everything.

    (Written as a bound, not ``mask & (pid_e == 0)``, which the interpreter turns into int32.)
    """
    return tl.where(pid_e == 0, d, 0)


@triton.jit
def _tile_range(n, tiles_per_split, BLOCK_N: tl.constexpr):
    start = tl.program_id(1) * tiles_per_split
    end = tl.minimum(start + tiles_per_split, tl.cdiv(n, BLOCK_N))
    return start, end


@triton.jit
def _state_partials_kernel(
    K, V, WS_S, WS_Z,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N, D, DV, scale, tiles_per_split,
    FEATURE_MAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Partial ``s * sum_j phi(k_j)^T v_j`` (D x BLOCK_DV) and ``s * sum_j phi(k_j)`` of one slice."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(2)
    k_base = K + (pid_bh // H) * stride_kb + (pid_bh % H) * stride_kh
    v_base = V + (pid_bh // H) * stride_vb + (pid_bh % H) * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_e = offs_e < DV

    acc_s = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start, end = _tile_range(N, tiles_per_split, BLOCK_N)
    for tile in range(start, end):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        rows = rows.to(tl.int64)
        mask_k = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_k, other=0.0)
        # Zero padded rows/columns after the feature map: elu1(0) = 1.
        kk = tl.where(mask_k, _phi(k.to(tl.float32), FEATURE_MAP), 0.0)
        v = tl.load(
            v_base + rows[:, None] * stride_vn + offs_e[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_e[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_s += tl.dot(tl.trans(kk), v, input_precision=DOT_PRECISION)
        acc_z += tl.sum(kk, axis=0)

    slot = pid_bh * tl.num_programs(1) + tl.program_id(1)
    tl.store(
        WS_S + slot * D * DV + offs_d[:, None] * DV + offs_e[None, :],
        acc_s * scale,
        mask=mask_d[:, None] & mask_e[None, :],
    )
    tl.store(WS_Z + slot * D + offs_d, acc_z * scale, mask=offs_d < _first_only(D, pid_e))


@triton.jit
def _output_kernel(
    Q, S, Z, OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, DV, eps, tiles_per_split,
    FEATURE_MAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``o = phi(q) S / (phi(q) . z + eps)`` for the query tiles of one slice, BLOCK_DV columns."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(2)
    q_base = Q + (pid_bh // H) * stride_qb + (pid_bh % H) * stride_qh
    o_base = OUT + (pid_bh // H) * stride_ob + (pid_bh % H) * stride_oh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_e = offs_e < DV
    s = tl.load(
        S + pid_bh * D * DV + offs_d[:, None] * DV + offs_e[None, :],
        mask=mask_d[:, None] & mask_e[None, :],
        other=0.0,
    )
    z = tl.load(Z + pid_bh * D + offs_d, mask=mask_d, other=0.0)

    start, end = _tile_range(N, tiles_per_split, BLOCK_N)
    for tile in range(start, end):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        rows = rows.to(tl.int64)
        mask_q = mask_n[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0)
        p = tl.where(mask_q, _phi(q.to(tl.float32), FEATURE_MAP), 0.0)
        den = tl.where(mask_n, tl.sum(p * z[None, :], axis=1) + eps, 1.0)
        o = tl.dot(p, s, input_precision=DOT_PRECISION) / den[:, None]
        tl.store(
            o_base + rows[:, None] * stride_on + offs_e[None, :] * stride_od,
            o.to(OUT.dtype.element_ty),
            mask=mask_n[:, None] & mask_e[None, :],
        )


@triton.jit
def _query_grad_kernel(
    Q, DO, S, Z, DQ, WS_A, WS_C,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, D, DV, eps, scale, tiles_per_split,
    FEATURE_MAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_E: tl.constexpr,
):  # fmt: skip
    """``dq`` (written by the ``e = 0`` programs) and partial ``A`` (BLOCK_DV columns), ``c``."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(2)
    q_base = Q + (pid_bh // H) * stride_qb + (pid_bh % H) * stride_qh
    do_base = DO + (pid_bh // H) * stride_ob + (pid_bh % H) * stride_oh
    dq_base = DQ + (pid_bh // H) * stride_dqb + (pid_bh % H) * stride_dqh
    s_base = S + pid_bh * D * DV
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_e = pid_e * BLOCK_DV + offs_dv
    mask_d = offs_d < D
    mask_e = offs_e < DV
    s_own = tl.load(
        s_base + offs_d[:, None] * DV + offs_e[None, :], mask=mask_d[:, None] & mask_e[None, :], other=0.0
    )
    z = tl.load(Z + pid_bh * D + offs_d, mask=mask_d, other=0.0)

    acc_a = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start, end = _tile_range(N, tiles_per_split, BLOCK_N)
    for tile in range(start, end):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        rows = rows.to(tl.int64)
        mask_q = mask_n[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0)
        q = q.to(tl.float32)
        p = tl.where(mask_q, _phi(q, FEATURE_MAP), 0.0)
        inv_den = 1.0 / tl.where(mask_n, tl.sum(p * z[None, :], axis=1) + eps, 1.0)
        do_own = tl.load(
            do_base + rows[:, None] * stride_on + offs_e[None, :] * stride_od,
            mask=mask_n[:, None] & mask_e[None, :],
            other=0.0,
        ).to(tl.float32)
        # t = dO S^T over the whole value dim: this program's columns, then the others.
        t = tl.dot(do_own, tl.trans(s_own), input_precision=DOT_PRECISION)
        for j in tl.static_range(1, NUM_E):
            cols = ((pid_e + j) % NUM_E) * BLOCK_DV + offs_dv
            mask_j = cols < DV
            do_j = tl.load(
                do_base + rows[:, None] * stride_on + cols[None, :] * stride_od,
                mask=mask_n[:, None] & mask_j[None, :],
                other=0.0,
            ).to(tl.float32)
            s_j = tl.load(
                s_base + offs_d[:, None] * DV + cols[None, :],
                mask=mask_d[:, None] & mask_j[None, :],
                other=0.0,
            )
            t += tl.dot(do_j, tl.trans(s_j), input_precision=DOT_PRECISION)
        g = tl.sum(p * t, axis=1) * inv_den * inv_den
        dq = (t * inv_den[:, None] - g[:, None] * z[None, :]) * _dphi(q, FEATURE_MAP)
        tl.store(
            dq_base + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
            dq.to(DQ.dtype.element_ty),
            mask=mask_n[:, None] & (offs_d[None, :] < _first_only(D, pid_e)),
        )
        acc_a += tl.dot(tl.trans(p), do_own * inv_den[:, None], input_precision=DOT_PRECISION)
        acc_c += tl.sum(p * g[:, None], axis=0)

    slot = pid_bh * tl.num_programs(1) + tl.program_id(1)
    tl.store(
        WS_A + slot * D * DV + offs_d[:, None] * DV + offs_e[None, :],
        acc_a * scale,
        mask=mask_d[:, None] & mask_e[None, :],
    )
    tl.store(WS_C + slot * D + offs_d, acc_c * scale, mask=offs_d < _first_only(D, pid_e))


@triton.jit
def _key_grad_kernel(
    K, V, A, C, DK, DVAL,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N, D, DV, tiles_per_split,
    FEATURE_MAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_E: tl.constexpr,
):  # fmt: skip
    """``dv = phi(k) A`` (BLOCK_DV columns) and ``dk = (v A^T - c) * phi'(k)`` (``e = 0`` programs)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(2)
    k_base = K + (pid_bh // H) * stride_kb + (pid_bh % H) * stride_kh
    v_base = V + (pid_bh // H) * stride_vb + (pid_bh % H) * stride_vh
    dk_base = DK + (pid_bh // H) * stride_dkb + (pid_bh % H) * stride_dkh
    dv_base = DVAL + (pid_bh // H) * stride_dvb + (pid_bh % H) * stride_dvh
    a_base = A + pid_bh * D * DV
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_e = pid_e * BLOCK_DV + offs_dv
    mask_d = offs_d < D
    mask_e = offs_e < DV
    a_own = tl.load(
        a_base + offs_d[:, None] * DV + offs_e[None, :], mask=mask_d[:, None] & mask_e[None, :], other=0.0
    )
    c = tl.load(C + pid_bh * D + offs_d, mask=mask_d, other=0.0)

    start, end = _tile_range(N, tiles_per_split, BLOCK_N)
    for tile in range(start, end):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        rows = rows.to(tl.int64)
        mask_k = mask_n[:, None] & mask_d[None, :]
        mask_v = mask_n[:, None] & mask_e[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_k, other=0.0)
        k = k.to(tl.float32)
        kk = tl.where(mask_k, _phi(k, FEATURE_MAP), 0.0)
        v_own = tl.load(
            v_base + rows[:, None] * stride_vn + offs_e[None, :] * stride_vd, mask=mask_v, other=0.0
        ).to(tl.float32)
        dv = tl.dot(kk, a_own, input_precision=DOT_PRECISION)
        tl.store(
            dv_base + rows[:, None] * stride_dvn + offs_e[None, :] * stride_dvd,
            dv.to(DVAL.dtype.element_ty),
            mask=mask_v,
        )
        # v A^T over the whole value dim: this program's columns, then the others.
        dkk = tl.dot(v_own, tl.trans(a_own), input_precision=DOT_PRECISION)
        for j in tl.static_range(1, NUM_E):
            cols = ((pid_e + j) % NUM_E) * BLOCK_DV + offs_dv
            mask_j = cols < DV
            v_j = tl.load(
                v_base + rows[:, None] * stride_vn + cols[None, :] * stride_vd,
                mask=mask_n[:, None] & mask_j[None, :],
                other=0.0,
            ).to(tl.float32)
            a_j = tl.load(
                a_base + offs_d[:, None] * DV + cols[None, :],
                mask=mask_d[:, None] & mask_j[None, :],
                other=0.0,
            )
            dkk += tl.dot(v_j, tl.trans(a_j), input_precision=DOT_PRECISION)
        dk = (dkk - c[None, :]) * _dphi(k, FEATURE_MAP)
        tl.store(
            dk_base + rows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
            dk.to(DK.dtype.element_ty),
            mask=mask_n[:, None] & (offs_d[None, :] < _first_only(D, pid_e)),
        )


@dataclass(frozen=True)
class _Config:
    block_n: int
    block_d: int
    block_dv: int
    num_e: int
    num_warps: int
    dot_precision: str


def _config(dim: int, dim_v: int, dtype: torch.dtype, device: torch.device) -> _Config:
    """Tile sizes: the whole (power-of-two padded) head dim, the value dim split when the state is large.

    Heuristics, not autotuned: query/key tiles shrink as the float32 state tile grows, to keep
    the backward programs (state tile + accumulator + four token tiles) within the register file.
    Under the interpreter small tiles keep the emulated matmuls cheap.
    """
    block_d = max(16, triton.next_power_of_2(dim))
    block_dv = min(max(16, triton.next_power_of_2(dim_v)), max(16, MAX_STATE_TILE // block_d))
    block_n = 64 if device.type == "cuda" and block_d * block_dv <= 64 * 128 else 32
    return _Config(
        block_n=block_n,
        block_d=block_d,
        block_dv=block_dv,
        num_e=triton.cdiv(dim_v, block_dv),
        num_warps=4 if block_d * block_dv <= 64 * 64 else 8,
        # Float32 inputs keep full float32 products; 16-bit inputs lose nothing to TF32.
        dot_precision="ieee" if dtype == torch.float32 else "tf32",
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried once per device, never at import)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(n: int, heads: int, cfg: _Config, device: torch.device) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` so that ``heads * splits * E`` programs about fill the GPU.

    The number of splits is bounded by the program target, not by ``n``, so workspaces of partial
    states stay O(programs). Every split gets at least one tile unless ``n == 0``.
    """
    tiles = triton.cdiv(n, cfg.block_n)
    target = PROGRAMS_PER_SM * _sm_count(device)
    splits = max(1, min(tiles, triton.cdiv(target, heads * cfg.num_e)))
    per_split = triton.cdiv(tiles, splits)
    return (triton.cdiv(tiles, per_split) if tiles else 1), per_split


def _bhnd_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """Strides of ``t`` ordered as (batch, head, token, dim)."""
    sb, s1, s2, sd = t.stride()
    return (sb, s2, s1, sd) if layout == "bnhd" else (sb, s1, s2, sd)


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """``(B, H, N, D)`` of ``t`` in ``layout``."""
    b, n1, n2, d = t.shape
    return (b, n2, n1, d) if layout == "bnhd" else (b, n1, n2, d)


def _new(shape_bhnd: tuple[int, int, int, int], layout: str, like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor in ``layout`` (uninitialised; every element is written by a kernel)."""
    b, h, n, d = shape_bhnd
    shape = (b, n, h, d) if layout == "bnhd" else (b, h, n, d)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def linear_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str,
    eps: float,
    layout: str,
    kv_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernels; inputs as in ``linear_attention`` (validated by the caller).

    Returns:
        ``o`` (contiguous, ``layout``, dtype of ``q``), and the reduced float32 state
        ``S`` ``(B*H, D, D_v)`` and ``z`` ``(B*H, D)``, both multiplied by ``s``, for the backward.
    """
    batch, heads, n_q, dim = _dims(q, layout)
    n_k, dim_v = _dims(k, layout)[2], v.shape[-1]
    scale = 1.0 / n_k if kv_scale is None else kv_scale
    cfg = _config(dim, dim_v, q.dtype, q.device)
    bh = batch * heads
    meta = dict(
        FEATURE_MAP=feature_map,
        DOT_PRECISION=cfg.dot_precision,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        BLOCK_DV=cfg.block_dv,
        num_warps=cfg.num_warps,
    )
    out = _new((batch, heads, n_q, dim_v), layout, q)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        splits, per_split = _split(n_k, bh, cfg, q.device)
        ws_s = torch.empty((bh, splits, dim, dim_v), dtype=torch.float32, device=q.device)
        ws_z = torch.empty((bh, splits, dim), dtype=torch.float32, device=q.device)
        _state_partials_kernel[(bh, splits, cfg.num_e)](
            k, v, ws_s, ws_z,
            *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
            heads, n_k, dim, dim_v, float(scale), per_split,
            **meta,
        )  # fmt: skip
        state, norm = ws_s.sum(dim=1), ws_z.sum(dim=1)
        splits, per_split = _split(n_q, bh, cfg, q.device)
        _output_kernel[(bh, splits, cfg.num_e)](
            q, state, norm, out,
            *_bhnd_strides(q, layout), *_bhnd_strides(out, layout),
            heads, n_q, dim, dim_v, float(eps), per_split,
            **meta,
        )  # fmt: skip
    return out, state, norm


def linear_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    feature_map: str,
    eps: float,
    layout: str,
    kv_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels.

    Args:
        grad_out: ``dO``, shaped like the forward output (any strides).
        q, k, v, feature_map, eps, layout, kv_scale: the forward's arguments.
        state, norm: ``S`` ``(B*H, D, D_v)`` and ``z`` ``(B*H, D)`` saved by the forward.

    Returns:
        ``dq, dk, dv``, contiguous in ``layout``, in the dtypes of ``q, k, v``.
    """
    batch, heads, n_q, dim = _dims(q, layout)
    n_k, dim_v = _dims(k, layout)[2], v.shape[-1]
    scale = 1.0 / n_k if kv_scale is None else kv_scale
    cfg = _config(dim, dim_v, q.dtype, q.device)
    bh = batch * heads
    meta = dict(
        FEATURE_MAP=feature_map,
        DOT_PRECISION=cfg.dot_precision,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        BLOCK_DV=cfg.block_dv,
        NUM_E=cfg.num_e,
        num_warps=cfg.num_warps,
    )
    dq = _new((batch, heads, n_q, dim), layout, q)
    dk = _new((batch, heads, n_k, dim), layout, k)
    dv = _new((batch, heads, n_k, dim_v), layout, v)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        splits, per_split = _split(n_q, bh, cfg, q.device)
        ws_a = torch.empty((bh, splits, dim, dim_v), dtype=torch.float32, device=q.device)
        ws_c = torch.empty((bh, splits, dim), dtype=torch.float32, device=q.device)
        _query_grad_kernel[(bh, splits, cfg.num_e)](
            q, grad_out, state, norm, dq, ws_a, ws_c,
            *_bhnd_strides(q, layout), *_bhnd_strides(grad_out, layout), *_bhnd_strides(dq, layout),
            heads, n_q, dim, dim_v, float(eps), float(scale), per_split,
            **meta,
        )  # fmt: skip
        grad_state, grad_norm = ws_a.sum(dim=1), ws_c.sum(dim=1)
        splits, per_split = _split(n_k, bh, cfg, q.device)
        _key_grad_kernel[(bh, splits, cfg.num_e)](
            k, v, grad_state, grad_norm, dk, dv,
            *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
            *_bhnd_strides(dk, layout), *_bhnd_strides(dv, layout),
            heads, n_k, dim, dim_v, per_split,
            **meta,
        )  # fmt: skip
    return dq, dk, dv
