"""Registers, spills and shared memory of every compiled linear-attention kernel, per head-dim shape.

For each ``(D, D_v)`` in 40, 64, 80, 128, 160 and (40, 160) it runs one forward + backward
through the fused kernels (``backend="triton"``, bfloat16, ``(B, N, H, D)`` inputs) and reads the
kernels Triton compiled for it: ``n_regs`` (registers per thread), ``n_spills``, ``shared``
(bytes of shared memory), warps and stages, the tile constants, and how many programs fit on
one SM by registers and by shared memory. A shape whose kernels fail (say, out of resources) is
recorded with its error, and the others still run; the ``LINDIFF_LINEAR_*`` variables of
``kernels/linear_attention/config.py`` then work around it without editing code.

    python bench/kernel_resources.py                 # CUDA: N = 4096, B = 1, H = 4
    python bench/kernel_resources.py --smoke         # N = 256; without CUDA: a note, no kernels

Without CUDA the kernels run only under the Triton interpreter, which compiles nothing: the
JSON then says so. ``--target sm_90`` instead cross-compiles, on any machine, the kernels that
the launchers would start on such a GPU (the launchers run on ``meta`` tensors with recorders in
place of the kernels; Triton builds each for the target with its bundled ptxas): shared memory
from Triton, registers and local memory (spills) from the cubin (``cuobjdump -res-usage``), no
timing. Results go to ``bench/results/kernel_resources-<device>[-sm_90].json``, rewritten after
every shape (``"complete": false`` until the last).

    python bench/kernel_resources.py --target sm_90   # no GPU needed
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import platform
import re
import subprocess
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from common import device_label, save_results  # bench/ is on sys.path when run as a script

import lindiff
from lindiff.kernels.linear_attention import linear_attention

SHAPES = [(40, 40), (64, 64), (80, 80), (128, 128), (160, 160), (40, 160)]
KERNELS = ("_state_partials_kernel", "_output_kernel", "_query_grad_kernel", "_key_grad_kernel")
# Per-SM limits of an H100 / H200 (sm_90): 64K 32-bit registers, 228 KiB of shared memory.
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024


def compiled_variants(kernel) -> dict:
    """The compiled variants of a ``triton.jit`` kernel in this process: cache key -> CompiledKernel."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # triton >= 3.2
        return {key: compiled for cache in caches.values() for key, compiled in cache[0].items()}
    return {
        key: compiled for cache in getattr(kernel, "cache", {}).values() for key, compiled in cache.items()
    }


def constants(compiled) -> dict:
    """The UPPERCASE compile-time constants (tiles, dims, dot operands) a variant was built with."""
    src = getattr(compiled, "src", None)
    names = getattr(getattr(src, "fn", None), "arg_names", None)
    if names is None:
        return {}
    out = {}
    for key, value in getattr(src, "constants", {}).items():
        index = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        if isinstance(index, int) and names[index].isupper():
            out[names[index]] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def describe(name: str, compiled) -> dict:
    """Resources of one compiled variant, and the programs per SM they allow."""
    if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
        compiled._init_handles()
    meta = compiled.metadata
    threads = meta.num_warps * 32
    regs = compiled.n_regs
    return {
        "kernel": name,
        "n_regs": regs,
        "n_spills": compiled.n_spills,
        "shared_bytes": meta.shared,
        "num_warps": meta.num_warps,
        "num_stages": meta.num_stages,
        "programs_per_sm_by_registers": REGISTERS_PER_SM // max(1, regs * threads),
        "programs_per_sm_by_shared": SHARED_PER_SM // meta.shared if meta.shared else None,
        "constants": constants(compiled),
    }


def run_shape(dim: int, dim_v: int, tokens: int, device: torch.device) -> None:
    """One forward + backward through the Triton kernels at ``(1, tokens, 4, dim)``, bfloat16."""
    q, k = (torch.randn(1, tokens, 4, dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, tokens, 4, dim_v, device=device, dtype=torch.bfloat16)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, kv_scale="mean", backend="triton")
    torch.autograd.grad(out, leaves, torch.randn_like(out))
    torch.cuda.synchronize(device)


def compiled_by_run(dim: int, dim_v: int, tokens: int, device: torch.device) -> tuple[list[dict], str | None]:
    """Resources of the kernels Triton compiled for one forward + backward here, and its error if any."""
    tla = importlib.import_module("lindiff.kernels.linear_attention.triton_linear_attention")
    before = {name: set(compiled_variants(getattr(tla, name))) for name in KERNELS}
    error = None
    try:
        run_shape(dim, dim_v, tokens, device)
    except Exception as failure:  # an out-of-resources error is what this report is for
        error = "".join(traceback.format_exception_only(failure)).strip()
    kernels = [
        describe(name, compiled)
        for name in KERNELS
        for key, compiled in compiled_variants(getattr(tla, name)).items()
        if key not in before[name]
    ]
    return kernels, error


def report(
    shapes: list[tuple[int, int]],
    tokens: int,
    device: torch.device,
    emit: Callable[[dict], object],
    arch: int | None,
) -> None:
    """One record per ``(D, D_v)``, passed to ``emit``: its kernels' resources, or the error it raised.

    ``arch``: cross-compile for ``sm_<arch>`` (no GPU needed) instead of running on ``device``.
    """
    for dim, dim_v in shapes:
        record = {
            "dim": dim,
            "dim_v": dim_v,
            "tokens": tokens,
            "dtype": "bfloat16",
            "kernels": [],
            "error": None,
        }
        if arch is None:
            record["kernels"], record["error"] = compiled_by_run(dim, dim_v, tokens, device)
        else:
            try:
                record["kernels"] = cross_compile(dim, dim_v, tokens, arch)
            except Exception as failure:
                record["error"] = "".join(traceback.format_exception_only(failure)).strip()
        emit(record)
        print_record(record)


class _Recorder:
    """Stands in for a kernel: records each launch's arguments instead of launching."""

    def __init__(self, name: str, launches: list) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


def _recorded_launches(dim: int, dim_v: int, tokens: int, sms: int) -> list:
    """The kernel launches of one bfloat16 forward + backward on a GPU of ``sms`` SMs, on meta tensors."""
    tla = importlib.import_module("lindiff.kernels.linear_attention.triton_linear_attention")
    launches: list = []
    saved = {name: getattr(tla, name) for name in (*KERNELS, "_problem")}
    problem = saved["_problem"]
    try:
        for name in KERNELS:
            setattr(tla, name, _Recorder(name, launches))
        tla._problem = lambda *a: dataclasses.replace(problem(*a), device_type="cuda", sms=sms)
        q, k = (torch.empty(1, tokens, 4, dim, dtype=torch.bfloat16, device="meta") for _ in range(2))
        v = torch.empty(1, tokens, 4, dim_v, dtype=torch.bfloat16, device="meta")
        out, state, norm = tla.linear_attention_forward(q, k, v, "elu1", 1e-4, "bnhd", None)
        tla.linear_attention_backward(torch.empty_like(out), q, k, v, state, norm, "elu1", 1e-4, "bnhd", None)
    finally:
        for name, value in saved.items():
            setattr(tla, name, value)
    return [(getattr(tla, name), name, args, kwargs) for name, args, kwargs in launches]


def _source(kernel, args: tuple, kwargs: dict):
    """Triton's source of one launch, specialised as its JIT would (ints equal to 1 become constants,
    pointers and multiples of 16 are marked divisible by 16)."""
    from triton.compiler import ASTSource

    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in kwargs:
            signature[name], constexprs[name] = "constexpr", kwargs[name]
            continue
        value = args[index]
        if isinstance(value, torch.Tensor):
            signature[name], attrs[(index,)] = types[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def cross_compile(dim: int, dim_v: int, tokens: int, arch: int) -> list[dict]:
    """Resources of the kernels one forward + backward launches on an ``sm_<arch>`` GPU, built here."""
    import triton
    from triton.backends.compiler import GPUTarget

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    kernels = []
    for kernel, name, args, kwargs in _recorded_launches(dim, dim_v, tokens, sms=132):
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages")}
        compiled = triton.compile(
            _source(kernel, args, kwargs), target=GPUTarget("cuda", arch, 32), options=options
        )
        with tempfile.TemporaryDirectory() as folder:
            cubin = Path(folder) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run(
                [str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True
            ).stdout
        registers, local = (re.search(rf"{key}:(\d+)", usage) for key in ("REG", "LOCAL"))
        regs = int(registers.group(1)) if registers else None
        threads = options["num_warps"] * 32
        shared = compiled.metadata.shared
        kernels.append(
            {
                "kernel": name,
                "n_regs": regs,
                "n_spills": None,
                "local_bytes": int(local.group(1)) if local else None,
                "shared_bytes": shared,
                "num_warps": options["num_warps"],
                "num_stages": options["num_stages"],
                "programs_per_sm_by_registers": REGISTERS_PER_SM // (regs * threads) if regs else None,
                "programs_per_sm_by_shared": SHARED_PER_SM // shared if shared else None,
                "constants": {key: value for key, value in kwargs.items() if key.isupper()},
            }
        )
    return kernels


def print_record(record: dict) -> None:
    head = f"D={record['dim']:>3} Dv={record['dim_v']:>3}"
    if record["error"]:
        print(f"{head}  ERROR {record['error'].splitlines()[-1]}", flush=True)
    for k in record["kernels"]:
        c = k["constants"]
        tiles = "x".join(str(c.get(n, "?")) for n in ("BLOCK_N", "BLOCK_D", "BLOCK_DV"))
        spills = f"spills {k['n_spills']}" if k["n_spills"] is not None else f"local {k['local_bytes']} B"
        print(
            f"{head}  {k['kernel']:<24} tiles {tiles:<11} warps {k['num_warps']} stages {k['num_stages']}"
            f"  regs {k['n_regs']}  {spills}  shared {k['shared_bytes']} B",
            flush=True,
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="N (default 4096, --smoke 256)")
    parser.add_argument("--smoke", action="store_true", help="tiny N: a check that the script runs")
    parser.add_argument(
        "--target", default=None, help="cross-compile for this GPU instead, e.g. sm_90 (no GPU needed)"
    )
    parser.add_argument(
        "--shapes", nargs="+", default=None, help="DxDV pairs, e.g. 160x160 40x160 (default: the six above)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        if not all(re.fullmatch(r"\d+x\d+", shape) for shape in args.shapes):
            parser.error(f"--shapes must be DxDV pairs like 160x160, got {args.shapes}")
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes]
    arch = None
    if args.target is not None:
        match = re.fullmatch(r"(?:sm_)?(\d+)a?", args.target)
        if match is None:
            parser.error(f"--target must look like sm_90, got {args.target!r}")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            parser.error("--target compiles kernels: unset TRITON_INTERPRET")
        arch = int(match.group(1))
    tokens = args.tokens or (256 if args.smoke else 4096)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        triton_version = importlib.import_module("triton").__version__
    result = {
        "benchmark": "kernel_resources",
        "device": device_label(device),
        "target": None if arch is None else f"sm_{arch} (cross-compiled, not run)",
        "versions": {
            "lindiff": lindiff.__version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "shapes": [list(shape) for shape in shapes],
        "records": [],
        "note": None,
        "complete": False,
    }
    suffix = "" if arch is None else f"-sm_{arch}"
    path = args.out or f"kernel_resources-{device_label(device, short=True)}{suffix}.json"

    def emit(record: dict) -> None:
        result["records"].append(record)
        save_results(result, path)

    if triton_version is None or (arch is None and not cuda):
        result["note"] = (
            "no compiled kernels: no CUDA device (or no triton), so the Triton kernels run only under the "
            "interpreter here, which compiles nothing (--target sm_90 cross-compiles them instead)"
        )
        print(result["note"])
    else:
        where = result["target"] or result["device"]
        print(f"{where}  triton {triton_version}  N={tokens}, B=1, H=4, bfloat16")
        report(shapes, tokens, device, emit, arch)
    result["complete"] = True
    path = save_results(result, path)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
