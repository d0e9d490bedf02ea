"""Context parallelism over 2 processes: bytes each process sends per denoising step, and CPU time.

Each image's tokens are split over 2 processes (``lindiff.parallel.enable_context_parallel``,
Ulysses mode). Softmax attention goes through diffusers' Ulysses all-to-all, which moves q, k, v
and the output (bytes grow with the tokens); lindiff's linear methods all-reduce their float32
state ``[phi(K)^T V | sum phi(K)]`` (bytes independent of the tokens); LiT adds a halo of grid rows
for its depthwise convolution; CLEAR exchanges the keys/values within its window.

Bytes are counted by a wrapper around the collectives (``torch.distributed.all_reduce``,
``all_gather``, ``all_gather_into_tensor``, ``all_to_all_single`` and the functional
collectives ``all_to_all_single`` / ``all_gather_tensor`` / ``all_reduce`` that diffusers uses;
``torch.distributed.nn.functional`` calls the first ones), summing the bytes of the tensors each
process hands over (``payload``) and what a ring algorithm sends per process for them (``sent``:
all-reduce ``2 (P-1)/P n``, all-gather ``(P-1) n``, all-to-all ``(P-1)/P n``).

- ``bytes``: FLUX.1-dev widths (24 heads x 128, joint width 4096, pooled 768, RoPE 16/56/56), one
  double- and one single-stream block, 512 text tokens, at 256-2048 px (``(size/16)^2`` image
  tokens). The model lives on PyTorch's ``meta`` device and the process group is PyTorch's fake
  one: shapes flow, no arithmetic runs and no data moves, so the count is exact and free at any
  size. (Meta tensors carry no values, so the token grid lindiff reads from ``img_ids`` is given.)
  A full FLUX.1 has 19 + 38 blocks: its attention bytes are about 57/2 times these.
- ``time``: one step of a narrow FLUX (4 heads x 32, 2 + 2 blocks, 64 text tokens; real widths
  would take minutes per step here) on 1 process and split over 2 gloo processes, one thread
  each: CPU figures on a shared 2-core machine, showing the overhead, not a GPU's speed-up. The
  same run counts the bytes that really went over gloo, to check the meta count of that model.

    python bench/context_parallel.py            # bytes 256-2048 px; time 256, 512, 1024 px
    python bench/context_parallel.py --quick    # time 256 and 512 px, 2 timed steps

Results go to ``bench/results/context_parallel-cpu[-quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from common import device_label, save_results  # bench/ is on sys.path when run as a script
from diffusers import FluxTransformer2DModel

import lindiff
import lindiff.adapters.flux
import lindiff.parallel.pipeline
from lindiff.cli import environment
from lindiff.parallel import enable_context_parallel

WORLD = 2
METHODS = {
    "softmax": None,
    "linfusion": {},
    "lit": {},
    "clear": {"radius": 16},
}
"""Variants and their ``lindiff.linearize`` options (``None``: the model's softmax attention)."""
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
NARROW_MODEL = dict(
    FLUX_DEV,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    axes_dims_rope=(4, 14, 14),
)
TEXT_TOKENS = {"bytes": 512, "time": 64}
WIRE = {
    "all_reduce": 2 * (WORLD - 1) / WORLD,
    "all_gather": WORLD - 1,
    "all_to_all": (WORLD - 1) / WORLD,
    "output_gather": WORLD - 1,
}
"""Bytes a ring algorithm sends per process, per byte of payload, for each kind of collective."""


class ByteCounter:
    """Sums the bytes handed to each kind of collective while :meth:`counting`."""

    def __init__(self) -> None:
        self.payload: dict[str, int] = defaultdict(int)

    def _add(self, kind: str, tensor: torch.Tensor) -> None:
        self.payload[kind] += tensor.numel() * tensor.element_size()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count every collective; on meta tensors, return the right shapes without a real call."""
        originals = {
            "all_reduce": dist.all_reduce,
            "all_gather": dist.all_gather,
            "all_gather_into_tensor": dist.all_gather_into_tensor,
            "all_to_all_single": dist.all_to_all_single,
            "f_all_to_all": funcol.all_to_all_single,
            "f_all_gather": funcol.all_gather_tensor,
            "f_all_reduce": funcol.all_reduce,
        }

        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._add("all_reduce", tensor)
            return None if tensor.is_meta else originals["all_reduce"](tensor, *args, **kwargs)

        def all_gather(out: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._add("all_gather", tensor)
            return None if tensor.is_meta else originals["all_gather"](out, tensor, *args, **kwargs)

        def all_gather_into_tensor(out: torch.Tensor, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._add("all_gather", tensor)
            return (
                None if tensor.is_meta else originals["all_gather_into_tensor"](out, tensor, *args, **kwargs)
            )

        def all_to_all_single(out: torch.Tensor, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._add("all_to_all", tensor)
            return None if tensor.is_meta else originals["all_to_all_single"](out, tensor, *args, **kwargs)

        def f_all_to_all(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._add("all_to_all", tensor)
            return (
                torch.empty_like(tensor)
                if tensor.is_meta
                else originals["f_all_to_all"](tensor, *args, **kwargs)
            )

        def f_all_gather(
            tensor: torch.Tensor, gather_dim: int = 0, *args: Any, **kwargs: Any
        ) -> torch.Tensor:
            self._add("output_gather", tensor)  # diffusers' plan gathers the output at proj_out
            if tensor.is_meta:
                shape = list(tensor.shape)
                shape[gather_dim] *= WORLD
                return tensor.new_empty(shape)
            return originals["f_all_gather"](tensor, gather_dim, *args, **kwargs)

        def f_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._add("all_reduce", tensor)
            return (
                torch.empty_like(tensor)
                if tensor.is_meta
                else originals["f_all_reduce"](tensor, *args, **kwargs)
            )

        with contextlib.ExitStack() as stack:
            for module, name, wrapper in [
                (dist, "all_reduce", all_reduce),
                (dist, "all_gather", all_gather),
                (dist, "all_gather_into_tensor", all_gather_into_tensor),
                (dist, "all_to_all_single", all_to_all_single),
                (funcol, "all_to_all_single", f_all_to_all),
                (funcol, "all_gather_tensor", f_all_gather),
                (funcol, "all_reduce", f_all_reduce),
            ]:
                stack.enter_context(mock.patch.object(module, name, wrapper))
            yield

    def summary(self) -> dict[str, Any]:
        """Payload per kind, and the ring algorithms' bytes sent per process: in all, and by the
        attention layers (all but diffusers' output gather)."""
        payload = dict(sorted(self.payload.items()))
        sent = {kind: WIRE[kind] * n for kind, n in payload.items()}
        attention = sum(n for kind, n in sent.items() if kind != "output_gather")
        return {"payload": payload, "sent": round(sum(sent.values())), "attention_sent": round(attention)}


def flux_inputs(size: int, text: int, config: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """A FLUX call at ``size`` px: ``(size/16)^2`` image tokens and ``text`` text tokens."""
    side = size // 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, side * side, config["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
    }
    return {name: value.to(device) for name, value in inputs.items()}


def make_model(method: str, config: dict[str, Any], device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).eval()
    if METHODS[method] is not None:
        lindiff.linearize(model, method, **METHODS[method])
    return model.to(device)


def count_bytes(method: str, size: int, config: dict[str, Any], text: int) -> dict[str, Any]:
    """Bytes one process hands to the collectives in one step (meta device, fake process group)."""
    side = size // 16
    model = make_model(method, config, device="meta")
    # A model for shapes only: set up as if it were on the CPU (a CPU mesh over the fake group).
    with mock.patch.object(lindiff.parallel.pipeline, "_device_of", lambda model: torch.device("cpu")):
        enable_context_parallel(model)
    counter = ByteCounter()
    with (
        counter.counting(),
        mock.patch.object(lindiff.adapters.flux, "grid_of_ids", lambda ids: (1, side, side)),
        torch.no_grad(),
    ):
        model(**flux_inputs(size, text, config, "meta"), return_dict=False)
    return counter.summary()


def _not_run(error: Exception) -> dict[str, str]:
    return {"not run": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


def bytes_section(sizes: list[int]) -> dict[str, Any]:
    """:func:`count_bytes` for every method: at FLUX.1 widths for every size, and for the narrow
    model of the time section at 256 px (to check against the bytes that really go over gloo)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    found: dict[str, Any] = {"flux_dev_2_blocks": {}, "narrow_256px": {}}
    for method in METHODS:
        try:
            by_size = {str(size): count_bytes(method, size, FLUX_DEV, TEXT_TOKENS["bytes"]) for size in sizes}
            narrow = count_bytes(method, 256, NARROW_MODEL, TEXT_TOKENS["time"])
        except Exception as error:  # recorded: meta tensors carry no values for data-dependent steps
            by_size = narrow = _not_run(error)
        found["flux_dev_2_blocks"][method], found["narrow_256px"][method] = by_size, narrow
        print(f"bytes {method}: {json.dumps(by_size)}")
    dist.destroy_process_group()
    return found


def _median_step(step: Callable[[], object], repeats: int, together: bool) -> float:
    """Median wall time of ``repeats`` calls of ``step()`` after a warm-up; ``together``: the
    processes start each call at a barrier."""
    step()
    times = []
    for _ in range(repeats):
        if together:
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_case(method: str, size: int, repeats: int) -> dict[str, Any]:
    """Median step time on process 0 alone, then split over both; gloo bytes of the split step."""
    inputs = flux_inputs(size, TEXT_TOKENS["time"], NARROW_MODEL, "cpu")
    model = make_model(method, NARROW_MODEL)
    single = None
    with torch.no_grad():
        if dist.get_rank() == 0:
            single = _median_step(lambda: model(**inputs, return_dict=False), repeats, together=False)
        dist.barrier()
        enable_context_parallel(model)
        split = _median_step(lambda: model(**inputs, return_dict=False), repeats, together=True)
        counter = ByteCounter()
        with counter.counting():
            model(**inputs, return_dict=False)
    return {"one_process_s": single, "two_processes_s": split, "gloo_bytes": counter.summary()}


def _time_worker(rank: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    found: dict[str, Any] = {}
    for method in METHODS:
        found[method] = {}
        for size in sizes:
            try:
                found[method][str(size)] = _time_case(method, size, repeats)
            except Exception as error:  # recorded: a method that cannot run sharded
                found[method] = _not_run(error)
                traceback.print_exc()
                break
            if rank == 0:
                print(f"time {method} {size} px: {json.dumps(found[method][str(size)])}")
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


def time_section(sizes: list[int], repeats: int) -> dict[str, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "time.json"
        mp.spawn(_time_worker, args=(port, sizes, repeats, str(out)), nprocs=WORLD, join=True)
        return json.loads(out.read_text())


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Bytes the attention layers send per process per step vs image size, one line per method,
    and diffusers' output gather (the same for every method), log-log."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (the JSON has every number)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    gather: dict[int, float] = {}
    for method, by_size in result["bytes"]["flux_dev_2_blocks"].items():
        if "not run" in by_size:
            continue
        sizes = [int(size) for size in by_size]
        mib = [by_size[str(s)]["attention_sent"] / 2**20 for s in sizes]
        axes.plot(sizes, mib, marker="o", label=method)
        gather = {s: (by_size[str(s)]["sent"] - by_size[str(s)]["attention_sent"]) / 2**20 for s in sizes}
    axes.plot(list(gather), list(gather.values()), "k--", label="output gather (diffusers, all methods)")
    axes.set(xscale="log", yscale="log", xlabel="image size (px)", ylabel="MiB sent per process per step")
    axes.minorticks_off()
    axes.set_xticks(list(gather), [str(s) for s in gather])
    axes.set_title("attention exchange, FLUX.1 widths, 1 double + 1 single block, 2 processes", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="time 256 and 512 px with 2 timed steps")
    parser.add_argument("--byte-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--time-sizes", type=int, nargs="+", help="default: 256 512 1024 (quick: 256 512)")
    parser.add_argument("--repeats", type=int, help="timed steps per case (default: 5; quick: 2)")
    parser.add_argument(
        "--out", help="result file (default: bench/results/context_parallel-cpu[-quick].json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    time_sizes = args.time_sizes or ([256, 512] if args.quick else [256, 512, 1024])
    repeats = args.repeats or (2 if args.quick else 5)
    result = {
        "benchmark": "context_parallel",
        "description": __doc__.split("\n\n")[0],
        "device": device_label(torch.device("cpu")),
        "environment": environment(),
        "processes": WORLD,
        "mode": "ulysses",
        "methods": {name: options for name, options in METHODS.items()},
        "accounting": {
            "payload": "bytes of the tensors one process hands to each kind of collective per step",
            "sent": "ring algorithms' bytes sent per process: all-reduce 2(P-1)/P n, all-gather (P-1) n, "
            "all-to-all (P-1)/P n",
            "attention_sent": "sent, without output_gather: diffusers' gather of the output at proj_out "
            "(the same for every method)",
            "meta": "bytes.flux_dev_2_blocks is counted on the meta device; a method whose exchange reads "
            "values (clear all-gathers the shards' text lengths as a tensor) cannot run there and is "
            "marked 'not run'; time.*.gloo_bytes are real gloo counts on the narrow model",
        },
        "bytes_model": {**FLUX_DEV, "text_tokens": TEXT_TOKENS["bytes"]},
        "time_model": {**NARROW_MODEL, "text_tokens": TEXT_TOKENS["time"], "threads_per_process": 1},
        "bytes": bytes_section(args.byte_sizes),
        "time": time_section(time_sizes, repeats),
        "repeats": repeats,
    }
    name = "context_parallel-cpu" + ("-quick" if args.quick else "")
    path = save_results(result, args.out or f"{name}.json")
    plotted = plot(result, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {plotted}" if plotted else ""))
    return result


if __name__ == "__main__":
    main()
