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

    python bench/local_attention.py            # CUDA: grids 64..512, radius 8/16/32, 0/512 global
    python bench/local_attention.py --quick    # CPU smoke test (1 thread), < 2 min

Results go to ``bench/results/local_attention-<device>[-quick].json``.
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
from lindiff.kernels.local_attention import local_attention
from lindiff.kernels.local_attention.flex import compiled_flex_attention, get_plan
from lindiff.kernels.local_attention.reference import radius_threshold
from lindiff.kernels.local_attention.tiling import BLOCK_SIZE, choose_tile, count_blocks

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = {"grids": [64, 128, 256, 512], "radii": [8, 16, 32], "globals": [0, 512], "heads": 24, "dim": 128}
QUICK = {"grids": [16, 32, 64, 96], "radii": [4, 8], "globals": [0, 16], "heads": 4, "dim": 64}


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
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    return parser


def naive_flex(q, k, v, side: int, r2: int, global_kv):
    """Compiled FlexAttention with the obvious row-major window ``mask_mod`` and ``create_block_mask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    tokens = side * side
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


def block_stats(side: int, r2: int) -> dict:
    """Non-empty (query block, key block) pairs of the tiled and of the row-major block mask."""
    grid = (1, side, side)
    tile = choose_tile(grid, r2)
    partial, full = count_blocks(grid, tile, r2)
    blocks = math.ceil(side * side / BLOCK_SIZE) ** 2
    # A row-major block is BLOCK_SIZE // side whole rows, or a 1 / (side // BLOCK_SIZE) of a row.
    rows = None
    if BLOCK_SIZE % side == 0:
        rows = (1, BLOCK_SIZE // side, side)
    elif side % BLOCK_SIZE == 0:
        rows = (1, 1, BLOCK_SIZE)
    row_major = None if rows is None else sum(count_blocks(grid, rows, r2))
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
            **block_stats(side, radius_threshold(radius, (1, side, side))),
        }
        for side in grids
        for radius in radii
    ]


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
                r2 = radius_threshold(radius, (1, side, side))
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
                    **block_stats(side, r2),
                    "local_ms": median_ms(call, device, repeats),
                    "local_kernel_ms": None,
                    "sdpa_ms": sdpa_ms,
                    "sdpa_extrapolated": extrapolated,
                    "naive_flex_ms": None,
                }
                if cuda:
                    record["local_kernel_ms"] = median_ms(
                        kernel_only(q, k, v, side, r2, global_kv), device, repeats
                    )
                    if settings["naive"]:
                        record["naive_flex_ms"] = median_ms(
                            naive_flex(q, k, v, side, r2, global_kv), device, repeats
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


def kernel_only(q, k, v, side: int, r2: int, global_kv):
    """FlexAttention on tensors already in tile order (what the reorder costs is the difference)."""
    grid = (1, side, side)
    num_global = 0 if global_kv is None else global_kv[0].shape[1]
    plan = get_plan(grid, r2, choose_tile(grid, r2), num_global, q.device)
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
