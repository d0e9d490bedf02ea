"""Local (windowed) attention on square image-token grids: lindiff vs full SDPA vs naive FlexAttention.

For every grid, radius and global-token count, in one process and on the same inputs:

- ``local``: ``lindiff.kernels.local_attention`` end to end (tile reorder + FlexAttention +
  reorder back on CUDA; the chunked path on CPU), and on CUDA ``local_kernel``, the
  FlexAttention call alone on tile-ordered tensors;
- ``sdpa``: ``scaled_dot_product_attention`` over all ``N + M`` keys (full attention, the cost
  local attention replaces); above ``--sdpa-max-tokens`` it is extrapolated quadratically,
  ``t * N (N + M) / (N0 (N0 + M))``, from the largest grid measured, and labelled so;
- ``naive_flex`` (CUDA only): compiled FlexAttention with the obvious row-major ``mask_mod``
  (``(i // W - j // W)^2 + (i % W - j % W)^2 <= r^2``) and ``create_block_mask``, no reordering.

Times are medians of ``--repeats`` forward calls (CUDA events on GPU), after warm-up and
compilation. Ratios are baseline / local. The block counts of the tiled and the row-major
masks are recorded too (geometry only, so ``--quick`` reports them for the GPU grids as well).

``--density`` times nothing: it counts the non-empty FlexAttention blocks of ``clear``'s window
(radius 8, strict) on Wan's 480p x 81-frame latent grid ``(21, 30, 52)`` for several temporal
extents, and on FLUX's 1024 and 2048 px image grids, with the tile ``choose_tile`` picks and with
blocks of 128 consecutive row-major tokens (what ``create_block_mask`` on the untiled sequence
gives). Geometry only, exact, a few seconds on a CPU.

    python bench/local_attention.py            # CUDA: grids 64..512, radius 8/16/32, 0/512 global
    python bench/local_attention.py --quick    # CPU smoke test (1 thread), < 2 min
    python bench/local_attention.py --density  # block density of clear's window (no device work)

Results go to ``bench/results/local_attention-<device>[-quick].json`` and
``bench/results/local_attention-block-density.json``.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from common import device_label, median_ms, save_results  # bench/ is on sys.path when run as a script

import lindiff
from lindiff.attention.clear import ClearAttention, closed_radius
from lindiff.kernels.local_attention import local_attention
from lindiff.kernels.local_attention.flex import compiled_flex_attention, get_plan
from lindiff.kernels.local_attention.reference import (
    Grid3,
    Window,
    as_grid3,
    window_geometry,
)
from lindiff.kernels.local_attention.tiling import (
    BLOCK_SIZE,
    TileLayout,
    block_structure,
    choose_tile,
    count_blocks,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = {"grids": [64, 128, 256, 512], "radii": [8, 16, 32], "globals": [0, 512], "heads": 24, "dim": 128}
QUICK = {"grids": [16, 32, 64, 96], "radii": [4, 8], "globals": [0, 16], "heads": 4, "dim": 64}
# --density: clear's radius (strict) on Wan2.1's 480p x 81-frame latent grid (21 frames of 30 x 52
# tokens) with these temporal extents (None: every frame; "ball": one radius over frames, rows
# and columns, what clear did on video before frames_radius), and on FLUX's 1024 / 2048 px grids.
DENSITY = {
    "radius": 8,
    "video_grid": (21, 30, 52),
    "frames_radii": [None, 4, 2, 0, "ball"],
    "image_grids": [(64, 64), (128, 128)],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CPU-sized smoke run (small grids, 4 heads, fp32)"
    )
    parser.add_argument("--grids", type=int, nargs="+", default=None, help="square grid sides (tokens)")
    parser.add_argument("--radii", type=float, nargs="+", default=None, help="window radii (tokens)")
    parser.add_argument("--globals", type=int, nargs="+", default=None, help="global (text) token counts")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None, help="head dim")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per variant (default 10, quick 3)"
    )
    parser.add_argument(
        "--sdpa-max-tokens",
        type=int,
        default=None,
        help="largest N for measured SDPA (default 262144, quick 4096)",
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the row-major FlexAttention baseline")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's, 1 for --quick on CPU: steadier on a shared machine)",
    )
    parser.add_argument(
        "--density",
        action="store_true",
        help="only count the block density of clear's window on a video and image grids (no timing)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    return parser


def naive_flex(q, k, v, side: int, window: Window, global_kv):
    """Compiled FlexAttention with the obvious row-major window ``mask_mod`` and ``create_block_mask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    tokens, r2 = side * side, window.r2
    num_global = 0
    if global_kv is not None:
        num_global = global_kv[0].shape[1]
        k, v = torch.cat([k, global_kv[0]], 1), torch.cat([v, global_kv[1]], 1)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

    def mask_mod(b, h, q_idx, kv_idx):
        dh = q_idx // side - kv_idx // side
        dw = q_idx % side - kv_idx % side
        return (kv_idx >= tokens) | (dh * dh + dw * dw <= r2)

    block_mask = torch.compile(create_block_mask)(
        mask_mod, None, None, tokens, tokens + num_global, device=q.device
    )
    flex = compiled_flex_attention()
    return lambda: flex(qh, kh, vh, block_mask=block_mask)


def block_stats(side: int, window: Window) -> dict:
    """Non-empty (query block, key block) pairs of the tiled and of the row-major block mask."""
    grid = (1, side, side)
    tile = choose_tile(grid, window)
    partial, full = count_blocks(grid, tile, window)
    blocks = math.ceil(side * side / BLOCK_SIZE) ** 2
    # A row-major block is BLOCK_SIZE // side whole rows, or a 1 / (side // BLOCK_SIZE) of a row.
    rows = None
    if BLOCK_SIZE % side == 0:
        rows = (1, BLOCK_SIZE // side, side)
    elif side % BLOCK_SIZE == 0:
        rows = (1, 1, BLOCK_SIZE)
    row_major = None if rows is None else sum(count_blocks(grid, rows, window))
    return {
        "tile": list(tile[1:]),
        "partial_blocks": partial,
        "full_blocks": full,
        "density": (partial + full) / blocks,
        "row_major_blocks": row_major,
        "row_major_density": None if row_major is None else row_major / blocks,
    }


def geometry(grids: list[int], radii: list[float]) -> list[dict]:
    """``block_stats`` for every grid and radius (no device work)."""
    return [
        {
            "grid": [side, side],
            "radius": radius,
            **block_stats(side, window_geometry(radius, None, (1, side, side))),
        }
        for side in grids
        for radius in radii
    ]


def _row_segments(grid: Grid3, block: int) -> torch.Tensor:
    """``(S, 5)`` int64 ``(block, t, h, w_first, w_last)``: the pieces of grid rows each run of
    ``block`` consecutive row-major tokens is made of."""
    width = grid[2]
    rows = math.prod(grid) // width
    cuts = torch.arange(0, rows * width + 1, width)  # row starts, and the end
    cuts = torch.unique(torch.cat([cuts, torch.arange(0, rows * width, block)]))
    first, stop = cuts[:-1], cuts[1:]
    row = first // width
    return torch.stack(
        [first // block, row // grid[1], row % grid[1], first % width, (stop - 1) % width], dim=-1
    )


def row_major_blocks(grid: Grid3, window: Window, block: int = BLOCK_SIZE) -> dict:
    """Exact block counts of the window with blocks of ``block`` consecutive row-major tokens.

    A block is a few pieces of grid rows. Two pieces ``(t, h, [a, b])`` and ``(t', h', [c, d])``
    have a pair inside the window iff ``(t - t', h - h', gap)`` is, with ``gap`` the columns
    between the two intervals, and only such pairs iff ``(t - t', h - h', span)`` is, with ``span``
    the farthest columns apart. A pair of blocks is non-empty when a pair of their pieces is, and
    full when all are and the key block is whole (the last block of a grid that is no multiple of
    ``block`` is padded, so never full).
    """
    tokens = math.prod(grid)
    blocks = -(-tokens // block)
    pieces = _row_segments(grid, block)
    q, k = pieces[:, None, :], pieces[None, :, :]
    dt, dh = q[..., 1] - k[..., 1], q[..., 2] - k[..., 2]
    gap = (torch.maximum(k[..., 3] - q[..., 4], q[..., 3] - k[..., 4])).clamp(min=0)
    span = torch.maximum(q[..., 4] - k[..., 3], k[..., 4] - q[..., 3])
    pair = (q[..., 0] * blocks + k[..., 0]).flatten()
    any_inside = torch.zeros(blocks * blocks, dtype=torch.int64).index_add_(
        0, pair, window.inside(dt, dh, gap).flatten().long()
    )
    outside = torch.zeros(blocks * blocks, dtype=torch.int64).index_add_(
        0, pair, (~window.inside(dt, dh, span)).flatten().long()
    )
    whole = torch.ones(blocks, blocks, dtype=torch.bool)
    whole[:, -1] = tokens % block == 0
    is_full = (outside.view(blocks, blocks) == 0) & whole
    nonempty = any_inside.view(blocks, blocks) > 0
    return {"blocks": blocks, "partial": int((nonempty & ~is_full).sum()), "full": int(is_full.sum())}


def clear_window(grid: Grid3, radius: float, frames_radius: float | None) -> Window:
    """The window ``clear`` runs with ``ClearOptions(radius=..., frames_radius=...)`` on ``grid``."""
    mixer = ClearAttention(radius, None, frames_radius=frames_radius)
    return window_geometry(grid3=grid, **mixer.window())


def window_pairs(grid: Grid3, window: Window) -> int:
    """Query-key pairs of the grid inside the window: per offset ``(dt, dh, dw)`` inside it,
    ``(T - |dt|)(H - |dh|)(W - |dw|)`` pairs."""
    axes = [torch.arange(-min(r, g - 1), min(r, g - 1) + 1) for r, g in zip(window.reach, grid, strict=True)]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    counts = (torch.tensor(grid) - offsets.abs()).prod(-1)
    return int(counts[window.inside(*offsets.unbind(-1))].sum())


def density_record(grid: tuple[int, ...], radius: float, frames_radius: float | str | None) -> dict:
    """Non-empty FlexAttention blocks of ``clear``'s window (strict ``radius``; ``frames_radius``
    as ``ClearOptions`` takes it, or ``"ball"``) with ``choose_tile``'s tiles and with row-major
    blocks. ``density``: non-empty / all blocks of that blocking; ``computed``: the share of the
    ``N x N`` scores the non-empty blocks hold (comparable across blockings, padding included)."""
    grid3 = as_grid3(grid)
    if frames_radius == "ball":
        window = window_geometry(closed_radius(radius), None, grid3)
    else:
        window = clear_window(grid3, radius, frames_radius)
    tokens = math.prod(grid3)
    tile = choose_tile(grid3, window)
    layout = TileLayout(grid3, tile)
    num, _, full_num, _ = block_structure(layout, window)
    tiled = {"tile": list(tile), "blocks": layout.num_blocks, "partial": int(num.sum())}
    tiled["full"] = int(full_num.sum())
    rows = row_major_blocks(grid3, window)
    for counts in (tiled, rows):
        nonempty = counts["partial"] + counts["full"]
        counts["density"] = nonempty / counts["blocks"] ** 2
        counts["computed"] = nonempty * BLOCK_SIZE**2 / tokens**2
    return {
        "grid": list(grid),
        "tokens": tokens,
        "radius": radius,
        "frames_radius": "every frame" if frames_radius is None and grid3[0] > 1 else frames_radius,
        "window": {"r2": window.r2, "frames": window.frames},
        "window_fraction": window_pairs(grid3, window) / tokens**2,
        "tiled": tiled,
        "row_major": rows,
    }


def block_density() -> list[dict]:
    """``density_record`` for the video grid at every temporal extent of ``DENSITY`` and the image grids."""
    radius = DENSITY["radius"]
    records = [density_record(DENSITY["video_grid"], radius, f) for f in DENSITY["frames_radii"]]
    records += [density_record(grid, radius, None) for grid in DENSITY["image_grids"]]
    print(DENSITY_HEADER, flush=True)
    for record in records:
        print(format_density(record), flush=True)
    return records


def sdpa_baseline(q, k, v, global_kv, device, repeats, cap, measured) -> tuple[float | None, bool]:
    """Median ms of full SDPA over the ``N + M`` keys; extrapolated above ``cap`` tokens.

    ``measured`` maps a global count to the ``(tokens, ms)`` of the largest grid measured so far.
    """
    tokens = q.shape[1]
    num_global = 0 if global_kv is None else global_kv[0].shape[1]
    if tokens > cap:
        if num_global not in measured:
            return None, True
        base_tokens, base_ms = measured[num_global]
        return base_ms * tokens * (tokens + num_global) / (base_tokens * (base_tokens + num_global)), True
    if global_kv is not None:
        k, v = torch.cat([k, global_kv[0]], 1), torch.cat([v, global_kv[1]], 1)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    ms = median_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh), device, repeats)
    measured[num_global] = (tokens, ms)
    return ms, False


def resolve_settings(args: argparse.Namespace) -> dict:
    """``args`` with every default filled in (presets depend on ``--quick`` and the device)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = QUICK if args.quick else FULL
    settings = {name: getattr(args, name) or preset[name] for name in preset}
    settings.update(
        quick=args.quick,
        device=device,
        batch=args.batch,
        dtype=args.dtype or ("bf16" if device.startswith("cuda") else "fp32"),
        repeats=args.repeats or (3 if args.quick else 10),
        sdpa_max_tokens=args.sdpa_max_tokens or (4096 if args.quick else 262144),
        naive=not args.no_naive,
        threads=torch.get_num_threads(),
    )
    return settings


def as_namespace(args: argparse.Namespace | dict) -> argparse.Namespace:
    """``args`` itself, or the parser's defaults overridden by the dict's known keys (``quick``,
    ``device``, ``dtype``, ``repeats``, ...; other keys are ignored), e.g. ``bench/kernel_speed.py``'s settings."""
    if isinstance(args, argparse.Namespace):
        return args
    namespace = build_parser().parse_args([])
    for key, value in args.items():
        if hasattr(namespace, key):
            setattr(namespace, key, value)
    return namespace


def bench_local(args: argparse.Namespace | dict) -> list[dict]:
    """Run the sweep described by ``args`` (from ``build_parser``, or a dict for ``as_namespace``);
    one record per configuration.

    On CUDA, dynamo's caches are reset before each configuration, so every kernel is compiled
    for its static shapes (as in a pipeline at one resolution) and the sweep never reaches the
    recompile limit (past which dynamo would run FlexAttention's unfused eager code).
    """
    args = as_namespace(args)
    settings = resolve_settings(args)
    device = torch.device(settings["device"])
    grids, radii, globals_ = settings["grids"], settings["radii"], settings["globals"]
    heads, dim, repeats = settings["heads"], settings["dim"], settings["repeats"]
    dtype, sdpa_cap = DTYPES[settings["dtype"]], settings["sdpa_max_tokens"]
    cuda = device.type == "cuda"

    print(HEADER, flush=True)
    records, sdpa_measured = [], {}
    for side in grids:
        tokens = side * side
        shape = (args.batch, tokens, heads, dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        for num_global in globals_:
            global_kv = None
            if num_global:
                global_kv = tuple(
                    torch.randn(args.batch, num_global, heads, dim, device=device, dtype=dtype)
                    for _ in range(2)
                )
            sdpa_ms, extrapolated = sdpa_baseline(
                q, k, v, global_kv, device, repeats, sdpa_cap, sdpa_measured
            )
            for radius in radii:
                if cuda:
                    torch._dynamo.reset()
                window = window_geometry(radius, None, (1, side, side))
                call = functools.partial(
                    local_attention, q, k, v, grid=(side, side), radius=radius, global_kv=global_kv
                )
                record = {
                    "grid": [side, side],
                    "tokens": tokens,
                    "radius": radius,
                    "num_global": num_global,
                    "shape_bnhd": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "backend": "flex" if cuda else "chunked",
                    **block_stats(side, window),
                    "local_ms": median_ms(call, device, repeats),
                    "local_kernel_ms": None,
                    "sdpa_ms": sdpa_ms,
                    "sdpa_extrapolated": extrapolated,
                    "naive_flex_ms": None,
                }
                if cuda:
                    record["local_kernel_ms"] = median_ms(
                        kernel_only(q, k, v, side, window, global_kv), device, repeats
                    )
                    if settings["naive"]:
                        record["naive_flex_ms"] = median_ms(
                            naive_flex(q, k, v, side, window, global_kv), device, repeats
                        )
                local_ms = record["local_ms"]
                record["speedup_vs_sdpa"] = None if sdpa_ms is None else sdpa_ms / local_ms
                naive_ms = record["naive_flex_ms"]
                record["speedup_vs_naive_flex"] = None if naive_ms is None else naive_ms / local_ms
                records.append(record)
                print(format_row(record), flush=True)
    if any(r["sdpa_extrapolated"] for r in records):
        print("* SDPA extrapolated quadratically from the largest measured grid", flush=True)
    return records


def kernel_only(q, k, v, side: int, window: Window, global_kv):
    """FlexAttention on tensors already in tile order (what the reorder costs is the difference)."""
    grid = (1, side, side)
    num_global = 0 if global_kv is None else global_kv[0].shape[1]
    plan = get_plan(grid, window, choose_tile(grid, window), num_global, q.device)
    pad = plan.global_padded - num_global

    def tiled(x, extra):
        x = x.index_select(1, plan.gather)
        if extra is not None:
            x = torch.cat([x, extra, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1)
        return x.transpose(1, 2).contiguous()

    qf = tiled(q, None)
    kf, vf = (
        tiled(x, None if global_kv is None else g)
        for x, g in zip((k, v), global_kv or (None, None), strict=True)
    )
    flex = compiled_flex_attention()
    return lambda: flex(qf, kf, vf, block_mask=plan.block_mask)


# (title, width, record -> text) of the printed table; ratios are baseline / local.
COLUMNS = [
    ("grid", 9, lambda r: "x".join(map(str, r["grid"]))),
    ("radius", 6, lambda r: f"{r['radius']:g}"),
    ("glob", 4, lambda r: str(r["num_global"])),
    ("tile", 6, lambda r: "x".join(map(str, r["tile"]))),
    ("density", 7, lambda r: _num(r["density"], ".3f")),
    ("rowmaj", 6, lambda r: _num(r["row_major_density"], ".3f")),
    ("local ms", 9, lambda r: _num(r["local_ms"], ".2f")),
    ("kernel ms", 9, lambda r: _num(r["local_kernel_ms"], ".2f")),
    ("sdpa ms", 10, lambda r: _num(r["sdpa_ms"], ".2f") + ("*" if r["sdpa_extrapolated"] else "")),
    ("x sdpa", 7, lambda r: _num(r["speedup_vs_sdpa"], ".2f")),
    ("naive ms", 9, lambda r: _num(r["naive_flex_ms"], ".2f")),
    ("x naive", 7, lambda r: _num(r["speedup_vs_naive_flex"], ".2f")),
]
HEADER = " ".join(f"{title:>{width}}" for title, width, _ in COLUMNS)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_row(record: dict) -> str:
    return " ".join(f"{text(record):>{width}}" for _, width, text in COLUMNS)


# (title, width, record -> text) of the --density table.
DENSITY_COLUMNS = [
    ("grid", 10, lambda r: "x".join(map(str, r["grid"]))),
    ("frames", 11, lambda r: str(r["frames_radius"])),
    ("window", 7, lambda r: f"{r['window_fraction']:.4f}"),
    ("tile", 7, lambda r: "x".join(map(str, r["tiled"]["tile"]))),
    ("blocks", 6, lambda r: str(r["tiled"]["blocks"])),
    ("partial", 7, lambda r: str(r["tiled"]["partial"])),
    ("full", 6, lambda r: str(r["tiled"]["full"])),
    ("density", 7, lambda r: f"{r['tiled']['density']:.4f}"),
    ("computed", 8, lambda r: f"{r['tiled']['computed']:.4f}"),
    ("rm blocks", 9, lambda r: str(r["row_major"]["blocks"])),
    ("rm density", 10, lambda r: f"{r['row_major']['density']:.4f}"),
    ("rm computed", 11, lambda r: f"{r['row_major']['computed']:.4f}"),
]
DENSITY_HEADER = " ".join(f"{title:>{width}}" for title, width, _ in DENSITY_COLUMNS)


def format_density(record: dict) -> str:
    return " ".join(f"{text(record):>{width}}" for _, width, text in DENSITY_COLUMNS)


def versions() -> dict:
    triton = None
    try:
        import triton

        triton = triton.__version__
    except ImportError:
        pass
    return {
        "lindiff": lindiff.__version__,
        "torch": torch.__version__,
        "triton": triton,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.density:
        result = {
            "benchmark": "local_attention_block_density",
            "versions": versions(),
            "settings": {**DENSITY, "block_size": BLOCK_SIZE},
            "records": block_density(),
        }
        path = save_results(result, args.out or "local_attention-block-density.json")
        print(f"wrote {path}")
        return result
    if args.threads or (args.quick and not torch.cuda.is_available()):
        torch.set_num_threads(args.threads or 1)
    settings = resolve_settings(args)
    device = torch.device(settings["device"])
    records = bench_local(args)
    result = {
        "benchmark": "local_attention",
        "device": device_label(device),
        "versions": versions(),
        "settings": settings,
        "records": records,
        "geometry": geometry(FULL["grids"], FULL["radii"]),
    }
    suffix = "-quick" if args.quick else ""
    path = save_results(
        result, args.out or f"local_attention-{device_label(device, short=True)}{suffix}.json"
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
