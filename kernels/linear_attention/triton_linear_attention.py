"""Fused Triton kernels of non-causal linear attention (forward and backward) and their launchers.

Import this module only where Triton is installed (``autograd.py`` imports it lazily, at the
first call). Every kernel reads its inputs through ``(batch, head, token, dim)`` strides, so both
layouts and strided views run without copies; tiles are cast to float32 right after ``tl.load``
(the interpreter mishandles bfloat16 arithmetic), every sum accumulates in float32, and each
``tl.dot`` takes the operand dtypes of ``config.dot_operands`` (bfloat16 inputs: bfloat16 tensor-core
products). Head and value dims are compile-time constants, so their masks are constant bounds.

Forward (``o_i = phi(q_i) S / (phi(q_i) . z + eps)``):
    1. ``_state_partials_kernel``, grid ``(num_d * num_e, SPLITS, B*H)``: each program walks
       its slice of the keys in ``BLOCK_N`` tiles and writes one ``BLOCK_D x BLOCK_DV`` tile of
       a partial ``s * [S | z]`` to a workspace.
    2. ``sum`` over the split axis in a fixed order (deterministic, no atomics); skipped for one split.
    3. ``_output_kernel``, grid ``(num_e, SPLITS, B*H)``: query tiles, the head dim in ``num_d``
       chunks, division in the epilogue.

Backward, with ``p = phi(q)``, ``den_i = p_i . z + eps``, ``t_i = dO_i S^T``,
``g_i = dO_i . o_i / den_i = (p_i . t_i) / den_i^2``:
    1. ``_query_grad_kernel``: ``dq_i = (t_i / den_i - g_i z) * phi'(q_i)`` and partials of
       ``A = s * sum_i p_i^T dO_i / den_i`` and ``c = s * sum_i g_i p_i``.
    2. ``sum`` over the split axis.
    3. ``_key_grad_kernel``: ``dv_j = phi(k_j) A`` and ``dk_j = (v_j A^T - c) * phi'(k_j)``.
The backward holds the whole head dim in one tile; ``num_e`` tiles the value dim, and the
programs of one ``(head, split)`` then share the key/query tiles, each owning ``BLOCK_DV``
columns of the state.

Unnormalised form (``normalize=False``, the compile-time ``NORMALIZE`` of the output and
query-gradient kernels): ``o_i = phi(q_i) S``, i.e. ``den_i = 1`` and no ``z`` in the output, so
``g_i = 0``: ``dq_i = t_i * phi'(q_i)``, ``A = s * sum_i p_i^T dO_i``, ``c = 0``. The state and
key-gradient kernels are shared by both forms (the state pass still sums ``z``, a row sum of a
tile it holds; the key pass subtracts the zero ``c``).

The state-tile index is the first grid axis everywhere, so the programs that read the same
key or query tiles are launched next to each other and find them in L2. Tile sizes, splits and
their environment overrides are in ``config.py``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .config import INTERPRETER_SMS, Launch, Problem, backward_plan, env_overrides, forward_plan


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
def _round_to_bf16(x):
    """Float32 ``x`` rounded to the nearest bfloat16 (ties to even), kept in float32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` for float32 tiles, multiplied as ``DTYPE`` operands, accumulated in float32.

    ``EMULATE`` (the interpreter, whose ``tl.dot`` reads bfloat16 bit patterns as integers): the
    operands are rounded to ``DTYPE`` and multiplied in float32, the products the GPU forms.
    """
    if DTYPE == "fp32":
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    elif EMULATE:
        if DTYPE == "bf16":
            out = tl.dot(_round_to_bf16(a), _round_to_bf16(b), acc, input_precision="ieee")
        else:
            a16 = a.to(tl.float16).to(tl.float32)
            out = tl.dot(a16, b.to(tl.float16).to(tl.float32), acc, input_precision="ieee")
    elif DTYPE == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    return out


@triton.jit
def _dim_mask(offs, DIM: tl.constexpr, BLOCK: tl.constexpr):
    """``offs < DIM``; all true when the tiles cover ``DIM`` exactly (EVEN: no bound for the compiler)."""
    return tl.full(offs.shape, 1, tl.int1) if DIM % BLOCK == 0 else offs < DIM


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """``stride``, which the launcher found a multiple of ``ALIGN``, written so the compiler knows it.

    (``tl.multiple_of`` on a kernel argument is lost; ``stride // ALIGN * ALIGN`` is not.)
    """
    return stride // ALIGN * ALIGN


@triton.jit
def _head(PTR, pid_bh, H, stride_b, stride_h, stride_n, ALIGN: tl.constexpr):
    """``PTR`` at head ``pid_bh`` (batch ``pid_bh // H``, head ``pid_bh % H``) and its token stride.

    Every stride is a multiple of ``ALIGN`` elements (``_align``); saying so lets 16-byte vector
    loads through where a stride is no multiple of 16 (D = 40: a head stride of 40).
    """
    base = PTR + (pid_bh // H) * _aligned(stride_b, ALIGN) + (pid_bh % H) * _aligned(stride_h, ALIGN)
    return base, _aligned(stride_n, ALIGN)


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
    H, N, scale, tiles_per_split,
    FEATURE_MAP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_E: tl.constexpr,
    TOKEN_DOT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_D x BLOCK_DV`` tile of ``s * sum_j phi(k_j)^T v_j`` and ``s * sum_j phi(k_j)`` of one slice."""
    pid_d = tl.program_id(0) // NUM_E
    pid_e = tl.program_id(0) % NUM_E
    pid_bh = tl.program_id(2).to(tl.int64)
    k_base, stride_kn = _head(K, pid_bh, H, stride_kb, stride_kh, stride_kn, ALIGN)
    v_base, stride_vn = _head(V, pid_bh, H, stride_vb, stride_vh, stride_vn, ALIGN)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_d = _dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    mask_e = _dim_mask(offs_e, VALUE_DIM, BLOCK_DV)

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
        acc_s = _dot(tl.trans(kk), v, acc_s, TOKEN_DOT, PRECISION, EMULATE)
        acc_z += tl.sum(kk, axis=0)

    slot = pid_bh * tl.num_programs(1) + tl.program_id(1)
    tl.store(
        WS_S + slot * HEAD_DIM * VALUE_DIM + offs_d[:, None] * VALUE_DIM + offs_e[None, :],
        acc_s * scale,
        mask=mask_d[:, None] & mask_e[None, :],
    )
    tl.store(WS_Z + slot * HEAD_DIM + offs_d, acc_z * scale, mask=offs_d < _first_only(HEAD_DIM, pid_e))


@triton.jit
def _output_kernel(
    Q, S, Z, OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, eps, tiles_per_split,
    FEATURE_MAP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_D: tl.constexpr,
    STATE_DOT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ALIGN: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    """``o = phi(q) S / (phi(q) . z + eps)`` for the query tiles of one slice, BLOCK_DV columns
    (``o = phi(q) S`` without ``NORMALIZE``: ``z`` is not read).

    The head dim runs in ``NUM_D`` chunks of ``BLOCK_D``; with one chunk the state tile is loaded
    once, with several each chunk of it is reloaded per query tile (from L1/L2).
    """
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(2).to(tl.int64)
    q_base, stride_qn = _head(Q, pid_bh, H, stride_qb, stride_qh, stride_qn, ALIGN)
    o_base, stride_on = _head(OUT, pid_bh, H, stride_ob, stride_oh, stride_on, ALIGN)
    s_base = S + pid_bh * HEAD_DIM * VALUE_DIM
    z_base = Z + pid_bh * HEAD_DIM
    offs_e = pid_e * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_e = _dim_mask(offs_e, VALUE_DIM, BLOCK_DV)
    if NUM_D == 1:
        offs_d0 = tl.arange(0, BLOCK_D)
        mask_d0 = _dim_mask(offs_d0, HEAD_DIM, BLOCK_D)
        s_whole = tl.load(
            s_base + offs_d0[:, None] * VALUE_DIM + offs_e[None, :],
            mask=mask_d0[:, None] & mask_e[None, :],
            other=0.0,
        )
        if NORMALIZE:
            z_whole = tl.load(z_base + offs_d0, mask=mask_d0, other=0.0)

    start, end = _tile_range(N, tiles_per_split, BLOCK_N)
    for tile in range(start, end):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        rows = rows.to(tl.int64)
        num = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        den = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c in tl.static_range(NUM_D):
            offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d = _dim_mask(offs_d, HEAD_DIM, BLOCK_D)
            mask_q = mask_n[:, None] & mask_d[None, :]
            q = tl.load(
                q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0
            )
            p = tl.where(mask_q, _phi(q.to(tl.float32), FEATURE_MAP), 0.0)
            if NUM_D == 1:
                s = s_whole
            else:
                s = tl.load(
                    s_base + offs_d[:, None] * VALUE_DIM + offs_e[None, :],
                    mask=mask_d[:, None] & mask_e[None, :],
                    other=0.0,
                )
            if NORMALIZE:
                z = z_whole if NUM_D == 1 else tl.load(z_base + offs_d, mask=mask_d, other=0.0)
                den += tl.sum(p * z[None, :], axis=1)
            num = _dot(p, s, num, STATE_DOT, PRECISION, EMULATE)
        o = num / tl.where(mask_n, den + eps, 1.0)[:, None] if NORMALIZE else num
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
    H, N, eps, scale, tiles_per_split,
    FEATURE_MAP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_E: tl.constexpr,
    STATE_DOT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ALIGN: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    """``dq`` (written by the ``e = 0`` programs) and partial ``A`` (BLOCK_DV columns), ``c``.

    Without ``NORMALIZE`` (``den = 1``, ``g = 0``): ``dq = t * phi'(q)``, ``A = s * sum_i p_i^T dO_i``
    and ``c = 0`` (written as zeros, so that the key-gradient kernel is the same for both forms).
    """
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(2).to(tl.int64)
    q_base, stride_qn = _head(Q, pid_bh, H, stride_qb, stride_qh, stride_qn, ALIGN)
    do_base, stride_on = _head(DO, pid_bh, H, stride_ob, stride_oh, stride_on, ALIGN)
    dq_base, stride_dqn = _head(DQ, pid_bh, H, stride_dqb, stride_dqh, stride_dqn, ALIGN)
    s_base = S + pid_bh * HEAD_DIM * VALUE_DIM
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_e = pid_e * BLOCK_DV + offs_dv
    mask_d = _dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    mask_e = _dim_mask(offs_e, VALUE_DIM, BLOCK_DV)
    s_own = tl.load(
        s_base + offs_d[:, None] * VALUE_DIM + offs_e[None, :],
        mask=mask_d[:, None] & mask_e[None, :],
        other=0.0,
    )
    if NORMALIZE:
        z = tl.load(Z + pid_bh * HEAD_DIM + offs_d, mask=mask_d, other=0.0)

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
        if NORMALIZE:
            inv_den = 1.0 / tl.where(mask_n, tl.sum(p * z[None, :], axis=1) + eps, 1.0)
        do_own = tl.load(
            do_base + rows[:, None] * stride_on + offs_e[None, :] * stride_od,
            mask=mask_n[:, None] & mask_e[None, :],
            other=0.0,
        ).to(tl.float32)
        # t = dO S^T over the whole value dim: this program's columns, then the others.
        t = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        t = _dot(do_own, tl.trans(s_own), t, STATE_DOT, PRECISION, EMULATE)
        for j in tl.static_range(1, NUM_E):
            cols = ((pid_e + j) % NUM_E) * BLOCK_DV + offs_dv
            mask_j = _dim_mask(cols, VALUE_DIM, BLOCK_DV)
            do_j = tl.load(
                do_base + rows[:, None] * stride_on + cols[None, :] * stride_od,
                mask=mask_n[:, None] & mask_j[None, :],
                other=0.0,
            ).to(tl.float32)
            s_j = tl.load(
                s_base + offs_d[:, None] * VALUE_DIM + cols[None, :],
                mask=mask_d[:, None] & mask_j[None, :],
                other=0.0,
            )
            t = _dot(do_j, tl.trans(s_j), t, STATE_DOT, PRECISION, EMULATE)
        if NORMALIZE:
            g = tl.sum(p * t, axis=1) * inv_den * inv_den
            dq = (t * inv_den[:, None] - g[:, None] * z[None, :]) * _dphi(q, FEATURE_MAP)
        else:
            dq = t * _dphi(q, FEATURE_MAP)
        tl.store(
            dq_base + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
            dq.to(DQ.dtype.element_ty),
            mask=mask_n[:, None] & (offs_d[None, :] < _first_only(HEAD_DIM, pid_e)),
        )
        if NORMALIZE:
            acc_a = _dot(tl.trans(p), do_own * inv_den[:, None], acc_a, STATE_DOT, PRECISION, EMULATE)
            acc_c += tl.sum(p * g[:, None], axis=0)
        else:
            acc_a = _dot(tl.trans(p), do_own, acc_a, STATE_DOT, PRECISION, EMULATE)

    slot = pid_bh * tl.num_programs(1) + tl.program_id(1)
    tl.store(
        WS_A + slot * HEAD_DIM * VALUE_DIM + offs_d[:, None] * VALUE_DIM + offs_e[None, :],
        acc_a * scale,
        mask=mask_d[:, None] & mask_e[None, :],
    )
    tl.store(WS_C + slot * HEAD_DIM + offs_d, acc_c * scale, mask=offs_d < _first_only(HEAD_DIM, pid_e))


@triton.jit
def _key_grad_kernel(
    K, V, A, C, DK, DVAL,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N, tiles_per_split,
    FEATURE_MAP: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_E: tl.constexpr,
    STATE_DOT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """``dv = phi(k) A`` (BLOCK_DV columns) and ``dk = (v A^T - c) * phi'(k)`` (``e = 0`` programs)."""
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(2).to(tl.int64)
    k_base, stride_kn = _head(K, pid_bh, H, stride_kb, stride_kh, stride_kn, ALIGN)
    v_base, stride_vn = _head(V, pid_bh, H, stride_vb, stride_vh, stride_vn, ALIGN)
    dk_base, stride_dkn = _head(DK, pid_bh, H, stride_dkb, stride_dkh, stride_dkn, ALIGN)
    dv_base, stride_dvn = _head(DVAL, pid_bh, H, stride_dvb, stride_dvh, stride_dvn, ALIGN)
    a_base = A + pid_bh * HEAD_DIM * VALUE_DIM
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_e = pid_e * BLOCK_DV + offs_dv
    mask_d = _dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    mask_e = _dim_mask(offs_e, VALUE_DIM, BLOCK_DV)
    a_own = tl.load(
        a_base + offs_d[:, None] * VALUE_DIM + offs_e[None, :],
        mask=mask_d[:, None] & mask_e[None, :],
        other=0.0,
    )
    c = tl.load(C + pid_bh * HEAD_DIM + offs_d, mask=mask_d, other=0.0)

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
        dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        dv = _dot(kk, a_own, dv, STATE_DOT, PRECISION, EMULATE)
        tl.store(
            dv_base + rows[:, None] * stride_dvn + offs_e[None, :] * stride_dvd,
            dv.to(DVAL.dtype.element_ty),
            mask=mask_v,
        )
        # v A^T over the whole value dim: this program's columns, then the others.
        dkk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dkk = _dot(v_own, tl.trans(a_own), dkk, STATE_DOT, PRECISION, EMULATE)
        for j in tl.static_range(1, NUM_E):
            cols = ((pid_e + j) % NUM_E) * BLOCK_DV + offs_dv
            mask_j = _dim_mask(cols, VALUE_DIM, BLOCK_DV)
            v_j = tl.load(
                v_base + rows[:, None] * stride_vn + cols[None, :] * stride_vd,
                mask=mask_n[:, None] & mask_j[None, :],
                other=0.0,
            ).to(tl.float32)
            a_j = tl.load(
                a_base + offs_d[:, None] * VALUE_DIM + cols[None, :],
                mask=mask_d[:, None] & mask_j[None, :],
                other=0.0,
            )
            dkk = _dot(v_j, tl.trans(a_j), dkk, STATE_DOT, PRECISION, EMULATE)
        dk = (dkk - c[None, :]) * _dphi(k, FEATURE_MAP)
        tl.store(
            dk_base + rows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
            dk.to(DK.dtype.element_ty),
            mask=mask_n[:, None] & (offs_d[None, :] < _first_only(HEAD_DIM, pid_e)),
        )


# --- launchers ----------------------------------------------------------------------------------


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried once per device, never at import)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> Problem:
    """The sizes of a call, as the plans in ``config.py`` take them."""
    batch, heads, n_q, dim = _dims(q, layout)
    return Problem(
        heads=batch * heads,
        n_q=n_q,
        n_k=_dims(k, layout)[2],
        dim=dim,
        dim_v=v.shape[-1],
        dtype=q.dtype,
        device_type=q.device.type,
        sms=_sm_count(q.device),
    )


def _meta(launch: Launch) -> dict:
    """Compile-time constants and options shared by every kernel: tiles, warps, stages."""
    return dict(
        BLOCK_N=launch.block_n,
        BLOCK_D=launch.block_d,
        BLOCK_DV=launch.block_dv,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )


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


def _align(*tensors: torch.Tensor) -> int:
    """``ALIGN``: the largest power of two, up to 16 bytes of elements, dividing every stride of ``tensors``.

    The unit stride of the head dim is left out, and so are dims of size 1 (only index 0 is
    read); a head dim that is not unit-stride gives 1 (no vector loads then).
    """
    align = 16 // tensors[0].element_size()
    for t in tensors:
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return 1
        for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True):
            while size > 1 and stride % align:
                align //= 2
    return align


def _reduce(workspace: torch.Tensor) -> torch.Tensor:
    """The sum over the split axis (dim 1) of a workspace of partials; a view when there is one split."""
    return workspace[:, 0] if workspace.shape[1] == 1 else workspace.sum(dim=1)


def linear_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str,
    eps: float,
    layout: str,
    kv_scale: float | None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernels; inputs as in ``linear_attention`` (validated by the caller).

    Returns:
        ``o`` (contiguous, ``layout``, dtype of ``q``), and the reduced float32 state
        ``S`` ``(B*H, D, D_v)`` and ``z`` ``(B*H, D)``, both multiplied by ``s``, for the backward.
    """
    p = _problem(q, k, v, layout)
    plan = forward_plan(p, env_overrides())
    ops = plan.operands
    scale = 1.0 / p.n_k if kv_scale is None else kv_scale
    common = dict(FEATURE_MAP=feature_map, HEAD_DIM=p.dim, VALUE_DIM=p.dim_v)
    common.update(PRECISION=ops.precision, EMULATE=ops.emulate)
    batch, heads = _dims(q, layout)[:2]
    out = _new((batch, heads, p.n_q, p.dim_v), layout, q)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        st = plan.state
        ws_s = torch.empty((p.heads, st.splits, p.dim, p.dim_v), dtype=torch.float32, device=q.device)
        ws_z = torch.empty((p.heads, st.splits, p.dim), dtype=torch.float32, device=q.device)
        _state_partials_kernel[(st.num_d * st.num_e, st.splits, p.heads)](
            k, v, ws_s, ws_z,
            *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
            heads, p.n_k, float(scale), st.tiles_per_split,
            NUM_E=st.num_e, TOKEN_DOT=ops.token, ALIGN=_align(k, v), **_meta(st), **common,
        )  # fmt: skip
        state, norm = _reduce(ws_s), _reduce(ws_z)
        ot = plan.output
        _output_kernel[(ot.num_e, ot.splits, p.heads)](
            q, state, norm, out,
            *_bhnd_strides(q, layout), *_bhnd_strides(out, layout),
            heads, p.n_q, float(eps), ot.tiles_per_split,
            NUM_D=ot.num_d, STATE_DOT=ops.state, ALIGN=_align(q, out), NORMALIZE=normalize,
            **_meta(ot), **common,
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
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels.

    Args:
        grad_out: ``dO``, shaped like the forward output (any strides).
        q, k, v, feature_map, eps, layout, kv_scale, normalize: the forward's arguments.
        state, norm: ``S`` ``(B*H, D, D_v)`` and ``z`` ``(B*H, D)`` saved by the forward.

    Returns:
        ``dq, dk, dv``, contiguous in ``layout``, in the dtypes of ``q, k, v``.
    """
    p = _problem(q, k, v, layout)
    plan = backward_plan(p, env_overrides())
    ops = plan.operands
    scale = 1.0 / p.n_k if kv_scale is None else kv_scale
    common = dict(FEATURE_MAP=feature_map, HEAD_DIM=p.dim, VALUE_DIM=p.dim_v)
    common.update(STATE_DOT=ops.state, PRECISION=ops.precision, EMULATE=ops.emulate)
    batch, heads = _dims(q, layout)[:2]
    dq = _new((batch, heads, p.n_q, p.dim), layout, q)
    dk = _new((batch, heads, p.n_k, p.dim), layout, k)
    dv = _new((batch, heads, p.n_k, p.dim_v), layout, v)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        qt = plan.query
        ws_a = torch.empty((p.heads, qt.splits, p.dim, p.dim_v), dtype=torch.float32, device=q.device)
        ws_c = torch.empty((p.heads, qt.splits, p.dim), dtype=torch.float32, device=q.device)
        _query_grad_kernel[(qt.num_e, qt.splits, p.heads)](
            q, grad_out, state, norm, dq, ws_a, ws_c,
            *_bhnd_strides(q, layout), *_bhnd_strides(grad_out, layout), *_bhnd_strides(dq, layout),
            heads, p.n_q, float(eps), float(scale), qt.tiles_per_split,
            NUM_E=qt.num_e, ALIGN=_align(q, grad_out, dq), NORMALIZE=normalize, **_meta(qt), **common,
        )  # fmt: skip
        grad_state, grad_norm = _reduce(ws_a), _reduce(ws_c)
        kt = plan.key
        _key_grad_kernel[(kt.num_e, kt.splits, p.heads)](
            k, v, grad_state, grad_norm, dk, dv,
            *_bhnd_strides(k, layout), *_bhnd_strides(v, layout),
            *_bhnd_strides(dk, layout), *_bhnd_strides(dv, layout),
            heads, p.n_k, kt.tiles_per_split,
            NUM_E=kt.num_e, ALIGN=_align(k, v, dk, dv), **_meta(kt), **common,
        )  # fmt: skip
    return dq, dk, dv
