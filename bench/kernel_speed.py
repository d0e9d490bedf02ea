"""Attention kernels of lindiff against their baselines, measured in one process on the same inputs.

(Not named ``kernels.py``: run as a script, this folder is on ``sys.path`` and such a file would
shadow the ``kernels`` package that diffusers and peft probe for.)

Linear attention (``bench_linear``), for N from 1K to 1M tokens and the (B, H, D) of SD1.5
(B=2, H=8, D=40/80), SDXL (B=2, H=10/20, D=64), FLUX (B=1, H=24, D=128) and SANA-Video 2B
(B=2, H=20, D=112; timed as SANA-Video calls the operator: its RoPE-rotated numerator alone,
``feature_map="identity", normalize=False``), on ``(B, N, H, D)`` inputs (the layout the
LinFusion layer passes):

- ``triton`` (CUDA): ``linear_attention(..., backend="triton")``, the fused kernels;
- ``reference``: the chunked PyTorch path (``backend="reference"``; the only one on CPU);
- ``sdpa``: ``F.scaled_dot_product_attention`` on the same tensors as ``(B, H, N, D)`` views, the
  softmax attention linear attention replaces. Above ``--sdpa-max-n`` it is extrapolated
  quadratically from the two largest N measured and labelled ``"sdpa_extrapolated": true``.

Each is timed forward only and forward + backward (random ``dO``): the median of ``--repeats``
calls after warm-up, CUDA events on GPU, ``perf_counter`` on CPU. Bandwidth is the minimum
traffic (forward: read q, k, v, write o; backward: read q, k, v, dO, write dq, dk, dv) over the
time, quoted as a fraction of a device-to-device ``copy_`` measured in the same run. Ratios are
baseline time / lindiff time (the fastest lindiff path on the device: Triton on CUDA, the
reference on CPU).

    python bench/kernel_speed.py            # CUDA: N = 1K..1M (powers of 4), all shapes
    python bench/kernel_speed.py --quick    # CPU smoke run: reference vs SDPA at small N, < 2 min

Local attention at FLUX's token counts (``--sections local_flux``): CLEAR's window (radius 16
tokens, 512 text tokens global, 24 heads x 128) on the image-token grids of 2048 and 4096 px
(128 x 128 and 256 x 256) against SDPA over all keys, with the plan build, the first call
(which compiles FlexAttention for the geometry on CUDA) and the steady state timed apart.

    python bench/kernel_speed.py --sections local_flux linear --ns 4096 16384 65536 262144 1048576 \
        --shapes sd15-d40 sdxl-h10 flux --no-reference     # what bench/gpu_check.sh runs

Results go to ``bench/results/kernels-<device>[-quick].json`` (+ ``.png`` when matplotlib is
installed, unless ``--no-plot``), rewritten after every record so that a run cut short keeps
what it measured (``"complete": false``). ``--sections local`` adds the local-window attention
sweep of ``bench/local_attention.py`` (its presets; see that script for what it compares).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import device_label, median_ms, save_results, time_call  # bench/ is on sys.path as a script
from local_attention import bench_local

import lindiff
from lindiff.kernels.linear_attention import linear_attention
from lindiff.kernels.local_attention import clear_plan_cache, local_attention
from lindiff.kernels.local_attention.flex import get_plan
from lindiff.kernels.local_attention.reference import window_geometry
from lindiff.kernels.local_attention.tiling import choose_tile

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name -> (batch, heads, head dim)
SHAPES = {
    "sd15-d40": (2, 8, 40),
    "sd15-d80": (2, 8, 80),
    "sdxl-h10": (2, 10, 64),
    "sdxl-h20": (2, 20, 64),
    "flux": (1, 24, 128),
    "sana-video": (2, 20, 112),
}
# Operator options per shape (default: ELU + 1 features, normalised): SANA-Video's numerator.
SHAPE_OPTIONS = {"sana-video": {"feature_map": "identity", "normalize": False}}
FULL = {"ns": [4**i for i in range(5, 11)], "shapes": list(SHAPES), "repeats": 10, "sdpa_max_n": 65536}
QUICK = {"ns": [1024, 4096], "shapes": ["sd15-d40", "sdxl-h10"], "repeats": 3, "sdpa_max_n": 4096}
# CLEAR on FLUX: square image-token grids (2048 and 4096 px), window radius, text tokens, heads, dim.
LOCAL_FLUX = {"grids": [128, 256], "radius": 16, "num_global": 512, "heads": 24, "dim": 128}
LOCAL_FLUX_QUICK = {"grids": [16, 24], "radius": 4, "num_global": 16, "heads": 2, "dim": 32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized smoke run (N = 1K, 4K; two shapes)")
    parser.add_argument("--sections", nargs="+", default=None, help="sections to run (default: all)")
    parser.add_argument("--ns", type=int, nargs="+", default=None, help="token counts N")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per point (default 10, quick 3)"
    )
    parser.add_argument(
        "--sdpa-max-n", type=int, default=None, help="largest N for measured SDPA (default 65536, quick 4096)"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--local-grids", type=int, nargs="+", default=None, help="local_flux grid sides (default 128 256)"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="on CUDA, skip the PyTorch reference (time)"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no .png beside the JSON")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """``args`` with every default filled in (presets depend on ``--quick`` and the device)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = QUICK if args.quick else FULL
    return {
        "quick": args.quick,
        "device": device,
        "ns": args.ns or preset["ns"],
        "shapes": args.shapes or preset["shapes"],
        "dtype": args.dtype or ("bf16" if device.startswith("cuda") else "fp32"),
        "repeats": args.repeats or preset["repeats"],
        "sdpa_max_n": args.sdpa_max_n or preset["sdpa_max_n"],
        "reference": not args.no_reference,
        "local_flux": {**(LOCAL_FLUX_QUICK if args.quick else LOCAL_FLUX)}
        | ({"grids": args.local_grids} if args.local_grids else {}),
        "threads": torch.get_num_threads(),
    }


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device`` (read + write), 1 GiB on GPU, 256 MiB on CPU."""
    numel = 1 << 28 if device.type == "cuda" else 1 << 26
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def extrapolate_quadratic(points: list[tuple[int, float]], n: int) -> float:
    """Quadratic extrapolation ``t = a N^2`` with ``a`` averaged over the two largest measured N."""
    largest = sorted(points)[-2:]
    a = statistics.mean(ms / m**2 for m, ms in largest)
    return a * n**2


def _is_oom(error: BaseException) -> bool:
    message = str(error).lower()
    return (
        isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate" in message
    )


def time_method(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    repeats: int,
    *,
    options: dict | None = None,
) -> tuple[float | None, float | None]:
    """Forward and forward + backward median ms of one method; ``None`` where it ran out of memory.

    ``options``: further keyword arguments of ``linear_attention`` (``SHAPE_OPTIONS``)."""
    if method == "sdpa":
        fn = lambda *t: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in t)).transpose(1, 2)
    else:
        fn = lambda *t: linear_attention(*t, kv_scale="mean", backend=method, **(options or {}))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward():
        with torch.no_grad():
            return fn(q, k, v)

    def forward_backward():
        return torch.autograd.grad(fn(*leaves), leaves, grad)

    results = []
    for step in (forward, forward_backward):
        try:
            results.append(median_ms(step, q.device, repeats))
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
            results.append(None)
        if q.device.type == "cuda":
            torch.cuda.empty_cache()
    return results[0], results[1]


def bench_linear(settings: dict, emit: Callable[[dict], None]) -> None:
    """Linear attention: one record per (shape, N) with times, bandwidth fractions and ratios."""
    device = torch.device(settings["device"])
    dtype = DTYPES[settings["dtype"]]
    repeats = settings["repeats"]
    lindiff_method = "triton" if device.type == "cuda" else "reference"
    with_reference = lindiff_method == "triton" and settings["reference"]
    methods = [lindiff_method, *(["reference"] if with_reference else []), "sdpa"]
    copy_bps = copy_bandwidth(device, repeats)
    print_header()
    for shape in settings["shapes"]:
        batch, heads, dim = SHAPES[shape]
        sdpa_points: dict[str, list[tuple[int, float]]] = {"fwd": [], "fwd_bwd": []}
        for n in settings["ns"]:
            q, k, v, grad = (torch.randn(batch, n, heads, dim, device=device, dtype=dtype) for _ in range(4))
            tensor_bytes = q.numel() * q.element_size()
            record = {
                "section": "linear",
                "shape": shape,
                "batch": batch,
                "heads": heads,
                "dim": dim,
                "n": n,
                "options": SHAPE_OPTIONS.get(shape, {}),
                "dtype": str(dtype).removeprefix("torch."),
                "lindiff": lindiff_method,
                "bytes": {"fwd": 4 * tensor_bytes, "fwd_bwd": 11 * tensor_bytes},
                "copy_bytes_per_s": copy_bps,
                "ms": {},
                "sdpa_extrapolated": False,
            }
            for method in methods:
                if method == "sdpa" and n > settings["sdpa_max_n"]:
                    if sdpa_points["fwd"] and sdpa_points["fwd_bwd"]:
                        for key in ("fwd", "fwd_bwd"):
                            record["ms"][f"sdpa_{key}"] = extrapolate_quadratic(sdpa_points[key], n)
                        record["sdpa_extrapolated"] = True
                    continue
                fwd, fwd_bwd = time_method(method, q, k, v, grad, repeats, options=SHAPE_OPTIONS.get(shape))
                record["ms"][f"{method}_fwd"], record["ms"][f"{method}_fwd_bwd"] = fwd, fwd_bwd
                if method == "sdpa":
                    for key, ms in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                        if ms is not None:
                            sdpa_points[key].append((n, ms))
            del q, k, v, grad
            record["copy_fraction"] = {
                key: record["bytes"][key] / (ms * 1e-3) / copy_bps
                for key in ("fwd", "fwd_bwd")
                if (ms := record["ms"].get(f"{lindiff_method}_{key}")) is not None
            }
            record["ratios"] = {
                f"{base}_over_{lindiff_method}_{key}": record["ms"][f"{base}_{key}"]
                / record["ms"][f"{lindiff_method}_{key}"]
                for base in methods
                if base != lindiff_method
                for key in ("fwd", "fwd_bwd")
                if record["ms"].get(f"{base}_{key}") and record["ms"].get(f"{lindiff_method}_{key}")
            }
            emit(record)
            print_row(record)


def bench_local_flux(settings: dict, emit: Callable[[dict], None]) -> None:
    """``local_attention`` with CLEAR's window at FLUX's image-token grids against SDPA over all keys."""
    print(
        f"{'grid':>9} {'tokens':>7} {'plan s':>7} {'first s':>8} {'local ms':>9} {'sdpa ms':>9} {'x sdpa':>7}"
    )
    for side in settings["local_flux"]["grids"]:
        r = local_flux_point(side, settings)
        emit(r)
        print(
            f"{side}x{side:<5} {r['tokens']:>7} {_fmt(r['plan_build_s'], '.3f'):>7} {r['first_call_s']:>8.3f} "
            f"{r['local_ms']:>9.3f} {r['sdpa_ms']:>9.3f} {r['speedup_vs_sdpa']:>7.2f}",
            flush=True,
        )


def local_flux_point(side: int, settings: dict) -> dict:
    """One grid of ``bench_local_flux``: plan build, first call and steady state timed apart.

    The plan (token order + block mask) is built on a cleared cache and the first call runs
    after ``torch._dynamo.reset()``, as a pipeline's first step at a new resolution sees them;
    the steady state is the median of ``repeats`` calls after them. Without CUDA the op runs its
    chunked path, which has no plan.
    """
    device, dtype, repeats = torch.device(settings["device"]), DTYPES[settings["dtype"]], settings["repeats"]
    cfg = settings["local_flux"]
    heads, dim, radius, num_global = cfg["heads"], cfg["dim"], cfg["radius"], cfg["num_global"]
    tokens, grid3 = side * side, (1, side, side)
    q, k, v = (torch.randn(1, tokens, heads, dim, device=device, dtype=dtype) for _ in range(3))
    k_g, v_g = (torch.randn(1, num_global, heads, dim, device=device, dtype=dtype) for _ in range(2))
    window = window_geometry(radius, None, grid3)
    tile = choose_tile(grid3, window)
    plan_s = None
    if device.type == "cuda":
        clear_plan_cache()
        torch._dynamo.reset()
        plan_s = time_call(functools.partial(get_plan, grid3, window, tile, num_global, q.device), device)
    call = functools.partial(local_attention, q, k, v, grid=(side, side), radius=radius, global_kv=(k_g, v_g))
    qh, kh, vh = (
        q.transpose(1, 2),
        torch.cat([k, k_g], 1).transpose(1, 2),
        torch.cat([v, v_g], 1).transpose(1, 2),
    )
    with torch.no_grad():
        first_s = time_call(call, device)
        local = median_ms(call, device, repeats)
        sdpa = median_ms(functools.partial(F.scaled_dot_product_attention, qh, kh, vh), device, repeats)
    return {
        "grid": [side, side],
        "tokens": tokens,
        "radius": radius,
        "num_global": num_global,
        "heads": heads,
        "dim": dim,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": "flex" if device.type == "cuda" else "chunked",
        "tile": list(tile[1:]),
        "plan_build_s": plan_s,
        "first_call_s": first_s,
        "local_ms": local,
        "sdpa_ms": sdpa,
        "speedup_vs_sdpa": sdpa / local,
    }


def _bench_local(settings: dict, emit: Callable[[dict], None]) -> None:
    """``bench/local_attention.py``'s sweep (its presets) as a section."""
    for record in bench_local(settings):
        emit(record)


SECTIONS: dict[str, Callable[[dict, Callable[[dict], None]], None]] = {
    "linear": bench_linear,
    "local": _bench_local,
    "local_flux": bench_local_flux,
}


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_header() -> None:
    print(
        f"{'shape':>9} {'N':>8} {'fwd ms':>9} {'f+b ms':>9} {'fwd/copy':>8} "
        f"{'ref/x fwd':>9} {'ref/x f+b':>9} {'sdpa/x fwd':>10} {'sdpa/x f+b':>10}"
    )


def print_row(r: dict) -> None:
    lin, ratios = r["lindiff"], r["ratios"]
    mark = "*" if r["sdpa_extrapolated"] else " "
    print(
        f"{r['shape']:>9} {r['n']:>8} {_fmt(r['ms'].get(f'{lin}_fwd')):>9} "
        f"{_fmt(r['ms'].get(f'{lin}_fwd_bwd')):>9} {_fmt(r['copy_fraction'].get('fwd'), '.1%'):>8} "
        f"{_fmt(ratios.get(f'reference_over_{lin}_fwd')):>9} {_fmt(ratios.get(f'reference_over_{lin}_fwd_bwd')):>9} "
        f"{_fmt(ratios.get(f'sdpa_over_{lin}_fwd')):>9}{mark} {_fmt(ratios.get(f'sdpa_over_{lin}_fwd_bwd')):>9}{mark}",
        flush=True,
    )


def plot(records: list[dict], path: Path) -> Path | None:
    """Time vs N (log-log) per shape, lindiff and baselines; ``None`` (with a note) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (the JSON has every number)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linear = [r for r in records if r.get("section") == "linear"]
    local = [r for r in records if r.get("section") == "local" and not r["num_global"]]
    shapes = sorted({r["shape"] for r in linear})
    panels = len(shapes) + bool(local)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=False):
        rows = [r for r in linear if r["shape"] == shape]
        for key in sorted({key for r in rows for key in r["ms"]}):
            pts = [(r["n"], r["ms"][key]) for r in rows if r["ms"].get(key) is not None]
            style = "--" if key.startswith("sdpa") else "-"
            ax.loglog(*zip(*pts, strict=True), style, marker="o", label=key)
        ax.set(title=shape, xlabel="N tokens", ylabel="ms (median)")
        ax.grid(True, which="both", alpha=0.3)
    if local:
        ax = axes[0][-1]
        for radius in sorted({r["radius"] for r in local}):
            pts = [(r["tokens"], r["local_ms"]) for r in local if r["radius"] == radius]
            ax.loglog(*zip(*pts, strict=True), "-", marker="o", label=f"local r={radius}")
        sdpa = sorted({(r["tokens"], r["sdpa_ms"]) for r in local})
        ax.loglog(*zip(*sdpa, strict=True), "--", marker="o", label="sdpa")
        ax.set(title="local attention (no global tokens)", xlabel="N tokens", ylabel="ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.sections or ()) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {sorted(SECTIONS)}")
    settings = resolve_settings(args)
    device = torch.device(settings["device"])
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    result = {
        "benchmark": "kernels",
        "device": device_label(device),
        "versions": {
            "lindiff": lindiff.__version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "settings": settings,
        "records": [],
        "complete": False,
    }
    suffix = "-quick" if settings["quick"] else ""
    path = args.out or f"kernels-{device_label(device, short=True)}{suffix}.json"

    def emit(record: dict) -> None:
        result["records"].append({"section": name, **record})
        save_results(result, path)

    print(f"{result['device']}  torch {torch.__version__}  triton {triton_version}  {settings['dtype']}")
    print("ratios are baseline time / lindiff time; * = SDPA extrapolated quadratically")
    for name in args.sections or SECTIONS:
        print(f"\n[{name}]")
        SECTIONS[name](settings, emit)
    result["complete"] = True
    path = save_results(result, path)
    print(f"\nwrote {path}")
    png = None if args.no_plot else plot(result["records"], path.with_suffix(".png"))
    if png is not None:
        print(f"wrote {png}")
    return result


if __name__ == "__main__":
    main()
