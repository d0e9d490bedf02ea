"""Launch configuration of the Triton linear-attention kernels: tiles, grid splits, dot operands.

Plain Python (no Triton import), so the heuristics are tested on any machine; the launchers in
``triton_linear_attention.py`` turn a plan into grids and compile-time constants.

Tiles. A head (or value) dim up to 128 is one power-of-two tile, masked by a compile-time bound
(40 -> 64, 80 -> 128: the bound is a constant, so loads vectorise); a larger one is cut into
tiles of 32, 64 or 128, whichever pads least (160 -> 5 x 32 instead of one tile of 256). The
backward keeps the whole head dim in one tile (its dq and dk need all of it) and tiles only the
value dim.

Splits. The state pass cuts the keys of every head into ``splits`` slices whose partial states
(``D x D_v`` float32, written and read back by the reduction) cost at most ``1 / PARTIAL_RATIO``
of the key/value bytes the slice reads. Where that leaves the GPU short of
``PROGRAMS_PER_SM`` programs per SM, the state is tiled over ``D_v`` and ``D`` (down to
``MIN_STATE_BLOCK``) instead: more programs, no more partial traffic. Passes without partial
states (the output and the key gradients) split freely.

Dot operands (accumulation is always float32): bfloat16 inputs multiply bfloat16 operands,
states included (bfloat16 has float32's range); float16 inputs multiply float16 key and value
tiles but keep TF32 for every product with a state or with ``dO / den``, which can exceed
float16's 65504; float32 inputs multiply in full float32 (``"ieee"``).

Environment overrides (read at every launch; a bad value raises ``ValueError`` naming the
variable), to work around a resource error on a GPU without editing code:

    LINDIFF_LINEAR_BLOCK_D      rows of the forward state tile / head-dim chunk: 16, 32, 64, 128, 256
    LINDIFF_LINEAR_BLOCK_DV     columns of the state tile (value-dim chunk), every kernel: 16 .. 256
    LINDIFF_LINEAR_BLOCK_N      token tile, every kernel: 16, 32, 64, 128, 256
    LINDIFF_LINEAR_NUM_WARPS    warps per program: 1, 2, 4, 8, 16
    LINDIFF_LINEAR_NUM_STAGES   software-pipelining stages of the token loops: 1 .. 8

A fixed tile is never shrunk by the split heuristic.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Programs launched per streaming multiprocessor by the split passes.
PROGRAMS_PER_SM = 2
# Largest float32 state tile (BLOCK_D x BLOCK_DV) one program keeps in registers.
MAX_STATE_TILE = 128 * 128
# The split heuristic tiles the state no finer than this (forward: both dims; backward: D_v).
MIN_STATE_BLOCK = 32
# A slice of the state pass reads at least this many times the bytes of its partial state
# (written once, read once by the reduction).
PARTIAL_RATIO = 4
# Software-pipelining stages of the forward token loops (Triton's default on NVIDIA GPUs). The
# backward kernels load more tiles per step (dO, q and every value chunk of the state): with a
# head-dim tile of 128 they take 2 stages, of 256 (D = 160) one, which keeps them within an
# H100's 227 KiB of shared memory (their sm_90 builds need up to 254 KiB and 438 KiB at 3 stages).
DEFAULT_NUM_STAGES = 3
# Without a GPU (the interpreter) there is no SM count; a few programs per head still exercise
# the split reduction.
INTERPRETER_SMS = 4
# Token tile under the interpreter: small tiles keep the emulated matmuls cheap.
INTERPRETER_BLOCK_N = 32

_POWERS = (16, 32, 64, 128, 256)
OVERRIDES = {
    "block_d": ("LINDIFF_LINEAR_BLOCK_D", _POWERS),
    "block_dv": ("LINDIFF_LINEAR_BLOCK_DV", _POWERS),
    "block_n": ("LINDIFF_LINEAR_BLOCK_N", _POWERS),
    "num_warps": ("LINDIFF_LINEAR_NUM_WARPS", (1, 2, 4, 8, 16)),
    "num_stages": ("LINDIFF_LINEAR_NUM_STAGES", tuple(range(1, 9))),
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Overrides:
    """Launch settings fixed from the environment (``None``: chosen by the heuristics)."""

    block_d: int | None = None
    block_dv: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


@functools.cache
def _parse_overrides(raw: tuple[str | None, ...]) -> Overrides:
    values = {}
    for (field, (name, allowed)), text in zip(OVERRIDES.items(), raw, strict=True):
        if text is None or not text.strip():
            continue
        try:
            value = int(text)
        except ValueError:
            value = None
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {text!r}")
        values[field] = value
    return Overrides(**values)


def env_overrides(environ: Mapping[str, str] = os.environ) -> Overrides:
    """The ``LINDIFF_LINEAR_*`` overrides set in ``environ``; raises ``ValueError`` on a bad value."""
    return _parse_overrides(tuple(environ.get(name) for name, _ in OVERRIDES.values()))


@dataclass(frozen=True)
class Operands:
    """Dtypes (``"bf16"``, ``"fp16"``, ``"fp32"``) of the ``tl.dot`` operands; products accumulate in float32.

    Attributes:
        token: dots of two token tiles (``phi(k)^T v``).
        state: dots with a state (``S``, ``A``) or with ``dO / den`` as an operand.
        precision: ``input_precision`` of float32 operands (``"ieee"`` or ``"tf32"``).
        emulate: the Triton interpreter, whose ``tl.dot`` reads bfloat16 bit patterns as
            integers: operands are rounded to their dtype and multiplied in float32 (the same
            products as on the GPU). The compiled kernels feed the 16-bit tiles to the tensor cores.
    """

    token: str
    state: str
    precision: str
    emulate: bool


def dot_operands(dtype: torch.dtype, device_type: str) -> Operands:
    """The operand dtypes for inputs of ``dtype`` on a ``device_type`` (``"cuda"``, else the interpreter)."""
    emulate = device_type != "cuda"
    if dtype == torch.bfloat16:
        return Operands("bf16", "bf16", "tf32", emulate)
    if dtype == torch.float16:
        # S, A and dO / den can exceed float16's 65504: TF32 against them, float16 only for k and v.
        return Operands("fp16", "fp32", "tf32", emulate)
    return Operands("fp32", "fp32", "ieee", emulate)


def head_tile(dim: int) -> int:
    """The tile of a head or value dim: one power of two up to 128, else 32/64/128, least padding first."""
    if dim <= 128:
        return max(16, next_power_of_2(dim))
    return min((128, 64, 32), key=lambda block: cdiv(dim, block) * block)


@dataclass(frozen=True)
class Problem:
    """Sizes of one call: ``heads`` is ``B * H``; ``sms`` the GPU's multiprocessors."""

    heads: int
    n_q: int
    n_k: int
    dim: int
    dim_v: int
    dtype: torch.dtype
    device_type: str = "cuda"
    sms: int = 132

    def __post_init__(self) -> None:
        if self.heads > 65535:
            raise ValueError(
                f"batch * heads must be at most 65535 (a grid axis of the Triton kernels), got {self.heads}"
            )

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"

    @property
    def target(self) -> int:
        """Programs that about fill the GPU."""
        return PROGRAMS_PER_SM * self.sms


@dataclass(frozen=True)
class Launch:
    """Tiles, grid split and compile options of one kernel launch.

    ``num_d x num_e`` state tiles per (head, split): in the state pass both are grid axes; in
    the output pass ``num_d`` counts head-dim chunks of its loop; the backward has ``num_d == 1``.
    """

    block_n: int
    block_d: int
    block_dv: int
    num_d: int
    num_e: int
    splits: int
    tiles_per_split: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ForwardPlan:
    """``state``: grid ``(num_d * num_e, splits, B*H)``; ``output``: grid ``(num_e, splits, B*H)``."""

    state: Launch
    output: Launch
    operands: Operands


@dataclass(frozen=True)
class BackwardPlan:
    """``query`` (dq, partial A and c) and ``key`` (dk, dv): grids ``(num_e, splits, B*H)``."""

    query: Launch
    key: Launch
    operands: Operands


def _even_split(tiles: int, splits: int) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` with no empty split; one split (of nothing) when ``tiles == 0``."""
    if tiles == 0:
        return 1, 1
    per_split = cdiv(tiles, max(1, min(splits, tiles)))
    return cdiv(tiles, per_split), per_split


def _block_n(p: Problem, block_d: int, block_dv: int, forward: bool, fixed: int | None) -> int:
    """Token tile: smaller as the float32 state tile grows (the backward holds four token tiles)."""
    if fixed is not None:
        return fixed
    if not p.cuda:
        return INTERPRETER_BLOCK_N
    if forward:
        return 128 if block_d * block_dv <= 64 * 64 else 64
    return 64 if block_d * block_dv <= 64 * 128 else 32


def _num_warps(tiles: tuple[int, int, int], pass_: str, fixed: int | None) -> int:
    """4 warps; 8 for a state tile above 64 x 64, or for the output pass's float32 accumulator
    from 128 x 64 up (its sm_90 build takes 255 registers a thread with 4 warps, 128 with 8)."""
    if fixed is not None:
        return fixed
    block_n, block_d, block_dv = tiles
    large_output = pass_ == "output" and block_n * block_dv >= 128 * 64
    return 8 if block_d * block_dv > 64 * 64 or large_output else 4


def _num_stages(block_d: int, forward: bool, fixed: int | None) -> int:
    """Pipelining stages: ``DEFAULT_NUM_STAGES``, fewer for backward head-dim tiles above 64."""
    if fixed is not None:
        return fixed
    if forward or block_d <= 64:
        return DEFAULT_NUM_STAGES
    return 2 if block_d <= 128 else 1


# The kernels' passes: "state" and "output" run forward, "query" and "key" backward; "state" and
# "query" write partial states.
FORWARD_PASSES = ("state", "output")


def _launch(p: Problem, pass_: str, tiles: tuple[int, int, int], splits: int, o: Overrides) -> Launch:
    """A ``Launch`` of ``(block_n, block_d, block_dv)`` tiles over the pass's tokens in about ``splits`` slices."""
    block_n, block_d, block_dv = tiles
    tokens = p.n_k if pass_ in ("state", "key") else p.n_q
    splits, per_split = _even_split(cdiv(tokens, block_n), splits)
    return Launch(
        block_n=block_n,
        block_d=block_d,
        block_dv=block_dv,
        num_d=cdiv(p.dim, block_d),
        num_e=cdiv(p.dim_v, block_dv),
        splits=splits,
        tiles_per_split=per_split,
        num_warps=_num_warps(tiles, pass_, o.num_warps),
        num_stages=_num_stages(block_d, pass_ in FORWARD_PASSES, o.num_stages),
    )


def _free_launch(p: Problem, pass_: str, block_d: int, o: Overrides) -> Launch:
    """A pass without partial states (output, key gradients): as many slices as fill the GPU."""
    block_dv = o.block_dv or min(head_tile(p.dim_v), max(16, MAX_STATE_TILE // block_d))
    block_n = _block_n(p, block_d, block_dv, pass_ in FORWARD_PASSES, o.block_n)
    splits = cdiv(p.target, p.heads * cdiv(p.dim_v, block_dv))
    return _launch(p, pass_, (block_n, block_d, block_dv), splits, o)


def _partial_launch(p: Problem, pass_: str, block_d: int, o: Overrides) -> Launch:
    """A pass that writes partial states (forward state, backward query gradients).

    Slices hold at least ``PARTIAL_RATIO`` times their partial state's bytes of token tiles;
    while that leaves fewer than ``p.target`` programs, the larger free dim of the state tile is
    halved (the value dim first on ties; the head dim only in the forward, whose state pass
    tiles it over the grid).
    """
    forward = pass_ in FORWARD_PASSES
    tokens = p.n_k if forward else p.n_q
    min_tokens = cdiv(PARTIAL_RATIO * 8 * p.dim * p.dim_v, (p.dim + p.dim_v) * p.dtype.itemsize)
    block_dv = o.block_dv or min(head_tile(p.dim_v), max(16, MAX_STATE_TILE // block_d))
    while True:
        block_n = _block_n(p, block_d, block_dv, forward, o.block_n)
        state_tiles = cdiv(p.dim_v, block_dv) * (cdiv(p.dim, block_d) if forward else 1)
        most = cdiv(tokens, block_n) // cdiv(min_tokens, block_n)
        splits = max(1, min(most, cdiv(p.target, p.heads * state_tiles)))
        can_halve_dv = o.block_dv is None and block_dv > MIN_STATE_BLOCK
        can_halve_d = forward and o.block_d is None and block_d > MIN_STATE_BLOCK
        if p.heads * splits * state_tiles >= p.target or not (can_halve_dv or can_halve_d):
            break
        if can_halve_dv and (block_dv >= block_d or not can_halve_d):
            block_dv //= 2
        else:
            block_d //= 2
    return _launch(p, pass_, (block_n, block_d, block_dv), splits, o)


@functools.lru_cache(maxsize=1024)
def forward_plan(p: Problem, o: Overrides | None = None) -> ForwardPlan:
    """Tiles and splits of the two forward passes for ``p`` (cached: a model calls few shapes)."""
    o = o or Overrides()
    block_d = o.block_d or head_tile(p.dim)
    return ForwardPlan(
        state=_partial_launch(p, "state", block_d, o),
        output=_free_launch(p, "output", block_d, o),
        operands=dot_operands(p.dtype, p.device_type),
    )


@functools.lru_cache(maxsize=1024)
def backward_plan(p: Problem, o: Overrides | None = None) -> BackwardPlan:
    """Tiles and splits of the two backward passes (one head-dim tile: ``LINDIFF_LINEAR_BLOCK_D`` does not apply)."""
    o = o or Overrides()
    block_d = max(16, next_power_of_2(p.dim))
    return BackwardPlan(
        query=_partial_launch(p, "query", block_d, o),
        key=_free_launch(p, "key", block_d, o),
        operands=dot_operands(p.dtype, p.device_type),
    )
