"""How cost grows with resolution: the embedded model's high-resolution chain and a PixArt-architecture step.

Two sections, each with its softmax baseline measured in the same run:

- ``chain``: the embedded model (``lindiff.assets``: tiny-shapes, native 128 px) rendered as
  ``lindiff render`` renders it (``Renderer``: above the native size through ``HighResPipeline``,
  SDEdit stages with the default plan and strengths; in each stage the VAE tiled only when an
  untiled pass would take over half the free memory, its attention local and, on a CPU with
  bfloat16 arithmetic, its encoder and decoder in bfloat16 above a 1024 px image: recorded per row
  for the last stage as ``vae_tiled``, ``vae_local_attention`` and ``vae_bf16``), 25 steps,
  guidance 7.5, at 512 ... 8192 px: with its
  shipped LinFusion student (``tiny-shapes-linfusion``) and with its own softmax attention.
- ``dit``: one denoising step of a PixArt-Sigma-architecture transformer with random weights
  (``dit_step.py``'s builder, 4 of its 28 blocks, batch 1) at 512, 1024 and 2048 px: softmax
  (SDPA), CLEAR (radius 16) and LiT (2 heads, 5x5 depthwise convolution), as ``dit_step.py``
  converts them. Each row first runs one untimed step at the smallest size.

Softmax stops at a time cap (``--softmax-cap-s``): once one of its runs took longer, or the time
projected for the next size exceeds it, the larger sizes are recorded as ``"not run"`` with the
reason, never filled in. The projection is the larger of the measured growth (time proportional
to megapixels to the power fitted on the last two sizes) and the last run with its self-attention
multiplied by the square of the pixel ratio and the rest by the ratio.

Per row: wall time, seconds per megapixel, peak memory (``PeakMemory``: the process's absolute
resident-set high-water mark during the run, and the part above the memory in use before it;
CUDA allocator statistics on a GPU), and where the time went (``CATEGORIES``), from
``torch.profiler`` (CPU activities, no shapes, memory or stacks): ``record_function`` ranges
opened by forward hooks around every attention module of the denoiser, convolution operators
outside them, and the VAE's ``encode``/``decode`` calls timed around the call with the profiler's
collection paused (a tiled VAE pass at 8192 px is millions of operator events); the overhead is
the rest of the wall time. The profiler costs microseconds per operator it records (measured at
the start; ``profiler_cost_s`` per row), a tenth of a 1024 px chain's time, so a row runs twice,
timed without the profiler and then profiled for the breakdown (which keeps its own ``wall_s``),
unless the previous size's profiler cost is under 1% of the time projected for this one: then the
timed run itself is profiled (``"same_run": true``). ``--no-profile`` measures without it. CPU
only: on CUDA the host-side times of the ranges would not be the kernels', so no breakdown there.

    python bench/scaling.py                     # the full measurement: about 20 minutes on 2 CPU cores
    python bench/scaling.py --quick             # 256 and 512 px, 10 steps: a minute or two
    python bench/scaling.py --markdown          # the README table from the JSON, nothing run

Every finished row is appended to the ``.jsonl`` beside the JSON at once; a rerun skips the rows
already there (``--fresh`` starts over), and Ctrl-C keeps them. Results:
``bench/results/scaling-<device>[-quick].json``, ``.jsonl`` and ``.png`` (time and time per
megapixel against megapixels).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dit_step  # bench/ is on sys.path when run as a script
import torch
from common import RESULTS, device_label, save_results
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.profiler import ProfilerActivity, record_function
from tqdm.auto import tqdm

import lindiff
from lindiff.cli import environment
from lindiff.pipelines import HighResProgress, plan_stages
from lindiff.pipelines.batch import DEFAULT_GUIDANCE, DEFAULT_STEPS, Renderer, RenderItem, RenderOptions
from lindiff.pipelines.loading import SOFTMAX, load_pipeline, resolve_weights
from lindiff.pipelines.memory import vae_needs_tiling
from lindiff.pipelines.peak_memory import PeakMemory
from lindiff.pipelines.sdedit import default_strengths
from lindiff.pipelines.vae_attention import VAE_ATTENTION_TOKENS, vae_attention_tokens
from lindiff.pipelines.vae_precision import wants_bf16_vae

PROMPT = "a red circle above a blue square"
SEED = 0
CHAIN_MODEL, DIT_MODEL = "tiny-shapes", "pixart"
METHODS = {"chain": ("linfusion", SOFTMAX), "dit": (SOFTMAX, *dit_step.VARIANTS)}
RANGE = "scaling::"
CONV_OPS = frozenset(
    f"aten::{name}"
    for name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose2d")
)
CATEGORIES = {
    "attention": "the denoiser's attention modules, whole (projections, LinFusion's q/k MLPs, LiT's "
    "depthwise convolution, the kernel): self-attention, and cross-attention to the text",
    "convolutions": "convolution operators of the denoiser outside its attention modules (ResNet "
    "blocks, down/up-samplers, conv_in/conv_out, PixArt's patch embedding)",
    "vae": "every VAE encode and decode call, whole (tiling and blending included); vae_attention_s "
    "is its mid-block softmax attention, part of it",
    "overhead": "the rest of the wall time: the denoiser's norms, linear layers and feed-forwards "
    "outside attention, the text encoder, schedulers, the pixel-space upscale between stages, image "
    "conversion and Python (overhead_ops_s: operators the profiler saw; untraced_s: time it saw no "
    "operator in)",
}
GB = 1e9
PROFILE_SHARE = 0.01
"""The timed run carries the profiler when the profiler's estimated cost is under this share of it."""
TARGET_SIZES = {"chain_3x": 2048, "chain_8x": 4096, "largest": 8192, "spread_from": 1024, "dit_3x": 2048}


def megapixels(size: int) -> float:
    return size * size / 1e6


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null in the block: Kineto and c10 write a line there at every
    profiler start, stop and collection toggle, which would break up the progress bars."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def profiler_cost_per_event() -> float:
    """Seconds the CPU profiler adds to the wall time per operator it records (a loop of tiny additions)."""
    x, count, plain, profiled = torch.ones(8), 5000, [], []

    def loop() -> float:
        y, start = x, time.perf_counter()
        for _ in range(count):
            y = y + 1
        return time.perf_counter() - start

    for _ in range(3):
        plain.append(loop())
        with quiet_stderr(), torch.profiler.profile(activities=[ProfilerActivity.CPU]):
            profiled.append(loop())
    return max(0.0, min(profiled) - min(plain)) / count


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


class Breakdown:
    """Profiles the run in its block: attention ranges, convolutions, VAE calls (see :data:`CATEGORIES`).

    Forward hooks open a ``record_function`` range around every attention module of ``denoiser``;
    ``vae.encode`` and ``vae.decode`` are wrapped on the instance for the block (the profiler's
    collection paused inside them, their wall time taken around the call), and hooks time the VAE's
    own attention modules. Everything is removed when the block ends.
    """

    def __init__(self, denoiser: nn.Module, vae: nn.Module | None = None) -> None:
        self.denoiser, self.vae = denoiser, vae
        self.vae_s = self.vae_attention_s = 0.0
        self.profile: torch.profiler.profile | None = None
        self._undo: list[Callable[[], object]] = []
        self._open: list[Any] = []

    def _enter_range(self, name: str, module: nn.Module, args: tuple) -> None:
        self._open.append(record_function(name).__enter__())

    def _exit_range(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._open.pop().__exit__(None, None, None)

    def _collect(self, enable: bool) -> None:
        with quiet_stderr():
            self.profile.toggle_collection_dynamic(enable, [ProfilerActivity.CPU])

    def _vae_call(self, method: Callable) -> Callable:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            self._collect(False)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.vae_s += time.perf_counter() - start
                self._collect(True)

        return call

    def _hook(self, module: nn.Module, pre: Callable, post: Callable) -> None:
        handles = [
            module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True),
        ]
        self._undo += [handle.remove for handle in handles]

    def _time_vae_attention(self) -> None:
        started: list[float] = []

        def pre(module: nn.Module, args: tuple) -> None:
            started.append(time.perf_counter())

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            self.vae_attention_s += time.perf_counter() - started.pop()

        for module in attention_modules(self.vae):
            self._hook(module, pre, post)

    def __enter__(self) -> Breakdown:
        self.profile = torch.profiler.profile(activities=[ProfilerActivity.CPU])
        for module in attention_modules(self.denoiser):
            kind = "cross_attention" if getattr(module, "is_cross_attention", False) else "self_attention"
            self._hook(module, functools.partial(self._enter_range, RANGE + kind), self._exit_range)
        if self.vae is not None:
            self._time_vae_attention()
            for name in ("encode", "decode"):
                setattr(self.vae, name, self._vae_call(getattr(self.vae, name)))
                self._undo.append(functools.partial(delattr, self.vae, name))
        with quiet_stderr():
            self.profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            with quiet_stderr():
                self.profile.__exit__(*exc)
        finally:
            for undo in reversed(self._undo):
                undo()
            self._undo.clear()

    def top_level_seconds(self) -> tuple[Counter, int]:
        """Seconds of the outermost events of the busiest thread, by name; and the number of events.

        Reads the profiler's raw Kineto events (building ``FunctionEvent`` trees takes about 0.1 ms
        per event, a minute for a large chain): an event is outermost when it starts after the
        previous outermost one ended.
        """
        events = self.profile.profiler.kineto_results.events()
        threads: dict[int, list[tuple[int, int, str]]] = {}
        for event in events:
            threads.setdefault(event.start_thread_id(), []).append(
                (event.start_ns(), event.end_ns(), event.name())
            )
        busiest, count = Counter(), 0
        for spans in threads.values():
            seconds, end = Counter(), -1
            for start, stop, name in sorted(spans, key=lambda span: (span[0], -span[1])):
                if start >= end:
                    seconds[name] += (stop - start) / 1e9
                    end = stop
            if seconds.total() > busiest.total():
                busiest = seconds
            count += len(spans)
        return busiest, count

    def parts(self, wall_s: float, same_run: bool) -> dict[str, Any]:
        """Seconds per category of the profiled run, which took ``wall_s`` (``same_run``: the row's
        timed run itself), from the outermost events (ranges hold the operators inside them)."""
        start = time.perf_counter()
        names, events = self.top_level_seconds()
        seconds = Counter()
        for name, value in names.items():
            if name.startswith(RANGE):
                seconds[name[len(RANGE) :]] += value
            else:
                seconds["convolutions" if name in CONV_OPS else "overhead_ops"] += value
        attention = seconds["self_attention"] + seconds["cross_attention"]
        traced = attention + seconds["convolutions"] + self.vae_s + seconds["overhead_ops"]
        overhead = wall_s - attention - seconds["convolutions"] - self.vae_s
        parts = {"attention_s": attention, "convolutions_s": seconds["convolutions"], "vae_s": self.vae_s}
        parts["overhead_s"] = overhead
        return {
            "same_run": same_run,
            "wall_s": wall_s,
            **parts,
            "shares": {key[:-2]: value / wall_s for key, value in parts.items()},
            "self_attention_s": seconds["self_attention"],
            "cross_attention_s": seconds["cross_attention"],
            "vae_attention_s": self.vae_attention_s,
            "overhead_ops_s": seconds["overhead_ops"],
            "untraced_s": wall_s - traced,
            "sum_s": sum(parts.values()),
            # The parts sum to the wall time by construction; what the profiler and the VAE timer
            # saw must not exceed it (no double counting) and should cover most of it.
            "traced_share": traced / wall_s,
            "consistent": traced <= 1.02 * wall_s and overhead >= -0.02 * wall_s,
            "profiler_events": events,
            "profiler_cost_s": events * profiler_cost_per_event(),  # estimate, in wall_s
            "profiler_processing_s": time.perf_counter() - start,  # after the run, not in its wall time
        }


class StageBar:
    """One tqdm bar for a chain: its stages in turn, their steps as the count."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(total=0, unit="step", leave=False, disable=not enabled, position=1)
        self.label, self.stage = "", None

    def start(self, label: str) -> None:
        self.label, self.stage = label, None
        self.bar.reset(total=0)
        self.bar.set_description(label)

    def __call__(self, event: HighResProgress) -> None:
        if event.stage != self.stage:
            self.stage = event.stage
            self.bar.reset(total=event.num_steps)
            self.bar.set_description(
                f"{self.label}: stage {event.stage}/{event.num_stages} {event.width}x{event.height}"
            )
        self.bar.update(event.step - self.bar.n)


class Chain:
    """The embedded model as ``lindiff render`` runs it, switched between softmax and its LinFusion student."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.pipe = load_pipeline(method=SOFTMAX, device=str(device), dtype=args.dtype)
        options = RenderOptions(method=SOFTMAX, steps=args.steps, guidance=args.guidance)
        self.renderer = Renderer(self.pipe, options)
        self.linearized = False
        self.warm: set[str] = set()

    def use(self, method: str) -> None:
        """Convert the pipeline to ``method`` (``linfusion`` with the shipped weights) or back; warm it up once."""
        if (method != SOFTMAX) != self.linearized:
            if self.linearized:
                lindiff.restore(self.pipe)
            else:
                lindiff.linearize(self.pipe, method=method, weights=resolve_weights(None, method, None))
            self.linearized = not self.linearized
        if method not in self.warm:  # oneDNN primitives, allocator pools: a short chain, untimed
            self.renderer(RenderItem(0, PROMPT, "", SEED, 256, 256))
            self.warm.add(method)

    def _render(self, item: RenderItem, bar: StageBar, breakdown: Breakdown | None) -> dict[str, Any]:
        """One chain, profiled when ``breakdown`` is given: wall and per-stage seconds."""
        marks: dict[int, tuple[float, int]] = {}

        def on_progress(event: HighResProgress) -> None:
            bar(event)
            if event.step == event.num_steps:
                synchronize(self.device)
                marks[event.stage] = (time.perf_counter(), event.width)

        bar.start(f"chain {'profiled ' if breakdown else ''}{item.width} px")
        with breakdown or contextlib.nullcontext():
            start = time.perf_counter()
            self.renderer(item, on_progress)
            synchronize(self.device)
            wall = time.perf_counter() - start
        ends = [start] + [marks[stage][0] for stage in sorted(marks)]
        return {
            "wall_s": wall,
            "stage_sizes": [marks[stage][1] for stage in sorted(marks)],
            "stage_s": [b - a for a, b in itertools.pairwise(ends)],
            "final_decode_s": wall - (ends[-1] - start),
        }

    def run(self, method: str, size: int, bar: StageBar, profile_timed: bool) -> dict[str, Any]:
        """One chain to ``size`` px: wall and per-stage seconds, peak memory; the breakdown from the
        same run when ``profile_timed``, else (with ``--profile``) from a second, profiled one."""
        self.use(method)
        item = RenderItem(0, PROMPT, "", SEED, size, size)
        # The chain's own decision (tile_vae="auto"), from the free memory before it starts.
        chained = self.renderer.uses_highres(item)
        tiled = chained and vae_needs_tiling(self.pipe.vae, 1, size, size, self.device)
        tokens = vae_attention_tokens(self.pipe.vae, size, size)
        local_vae = chained and tokens is not None and tokens > VAE_ATTENTION_TOKENS
        bf16_vae = chained and wants_bf16_vae(self.pipe.vae, size, size, self.device)
        breakdown = Breakdown(self.pipe.unet, self.pipe.vae) if profile_timed else None
        memory = PeakMemory(self.device)
        memory.start()
        timed = self._render(item, bar, breakdown)
        row = measured_row("chain", CHAIN_MODEL, method, size, timed.pop("wall_s"), memory)
        row.update(timed, vae_tiled=tiled, vae_local_attention=local_vae, vae_bf16=bf16_vae, breakdown=None)
        if breakdown is None and self.args.profile:
            breakdown = Breakdown(self.pipe.unet, self.pipe.vae)
            row["breakdown"] = breakdown.parts(self._render(item, bar, breakdown)["wall_s"], same_run=False)
        elif breakdown is not None:
            row["breakdown"] = breakdown.parts(row["wall_s"], same_run=True)
        return row


class DiTStep:
    """``dit_step.py``'s PixArt-Sigma-architecture transformer, one step per row."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        self.spec = dit_step.MODELS[DIT_MODEL]
        self.config = dit_step.model_config(DIT_MODEL, args)
        torch.manual_seed(0)
        self.model = self.spec.build(self.config).to(device=device, dtype=self.dtype).eval()

    def inputs(self, size: int) -> dict[str, Any]:
        inputs = self.spec.inputs(self.spec, size, 1, torch.Generator().manual_seed(0))
        return dit_step.to_device(inputs, self.device, self.dtype)

    def _steps(self, inputs: dict[str, Any], count: int, breakdown: Breakdown | None) -> list[float]:
        times = []
        with breakdown or contextlib.nullcontext():
            for _ in range(count):
                start = time.perf_counter()
                self.model(**inputs, return_dict=False)
                synchronize(self.device)
                times.append(time.perf_counter() - start)
        return times

    def run(self, method: str, size: int, bar: StageBar, profile_timed: bool) -> dict[str, Any]:
        """A warm-up step at the smallest size, then ``--dit-repeats`` timed steps at ``size`` (profiled
        when ``profile_timed``, else followed by one profiled step where ``--profile``)."""
        bar.start(f"dit {method} {size} px")
        warm, inputs = self.inputs(min(self.args.dit_sizes)), self.inputs(size)
        breakdown = Breakdown(self.model) if profile_timed else None
        memory = PeakMemory(self.device)
        with dit_step.variant(self.model, method), torch.inference_mode():
            self.model(**warm, return_dict=False)
            memory.start()
            times = self._steps(inputs, self.args.dit_repeats, breakdown)
            row = measured_row("dit", DIT_MODEL, method, size, statistics.median(times), memory)
            if breakdown is None and self.args.profile:
                breakdown = Breakdown(self.model)
                parts = breakdown.parts(sum(self._steps(inputs, 1, breakdown)), same_run=False)
            elif breakdown is not None:  # of all the timed steps, per step
                parts = breakdown.parts(sum(times), same_run=True)
                parts = {k: v / len(times) if k.endswith("_s") else v for k, v in parts.items()}
        row.update(times_s=times, image_tokens=(size // dit_step.PIXELS_PER_TOKEN) ** 2)
        row["breakdown"] = parts if breakdown is not None else None
        return row


def measured_row(section: str, model: str, method: str, size: int, wall: float, memory: PeakMemory) -> dict:
    """The fields every measured row has; memory is read before anything else runs."""
    return {
        "section": section,
        "model": model,
        "method": method,
        "size": size,
        "status": "ok",
        "megapixels": megapixels(size),
        "wall_s": wall,
        "s_per_megapixel": wall / megapixels(size),
        "peak_rss_mib": memory.peak_bytes() / 2**20,
        "peak_added_mib": memory.added_bytes() / 2**20,
    }


def row_key(section: str, model: str, method: str, size: int) -> str:
    return f"{section}/{model}/{method}/{size}"


class Journal:
    """Finished rows, one JSON line each after a first line of settings; a rerun skips those rows.

    Raises:
        SystemExit: the file was written with other device, dtype or profiling settings (rerun
            with ``--fresh`` or another ``--out``); rows of a section whose own settings changed
            are dropped and measured again.
    """

    def __init__(self, path: Path, settings: dict[str, Any], fresh: bool) -> None:
        self.path, self.rows = path, {}
        if fresh:
            path.unlink(missing_ok=True)
        lines = path.read_text().splitlines() if path.exists() else []
        records = [json.loads(line) for line in lines[:-1]]
        try:
            records += [json.loads(line) for line in lines[-1:]]
        except json.JSONDecodeError:  # cut short by a crash while it was written: measured again
            path.write_text("".join(json.dumps(record, default=str) + "\n" for record in records))
        if not records:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
            self._append({"settings": settings})
            return
        header, *finished = records
        old = header.get("settings", {})
        common = [key for key in settings if key not in METHODS]
        if any(old.get(key) != settings[key] for key in common):
            raise SystemExit(
                f"{path} holds rows measured with other settings ({old}, now "
                f"{settings}); rerun with --fresh to start over, or give another --out"
            )
        # A section whose own settings changed (e.g. the chain's default strengths) is measured
        # again; the other section's rows stay.
        stale = sorted(section for section in METHODS if old.get(section) != settings.get(section))
        if stale:
            print(f"{path}: the {' and '.join(stale)} settings changed; those rows are measured again")
            finished = [row for row in finished if row["section"] not in stale]
            path.write_text("")
            for record in [{"settings": settings}, *finished]:
                self._append(record)
        self.rows = {row_key(r["section"], r["model"], r["method"], r["size"]): r for r in finished}

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as sink:
            sink.write(json.dumps(record, default=str) + "\n")
            sink.flush()
            os.fsync(sink.fileno())

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row_key(row["section"], row["model"], row["method"], row["size"])] = row
        self._append(row)


def project(measured: list[dict], size: int) -> tuple[float, str]:
    """Seconds projected for ``size`` from the rows measured at smaller sizes (ascending), and how."""
    last = measured[-1]
    ratio = megapixels(size) / last["megapixels"]
    estimates = {}
    if len(measured) >= 2:
        prev = measured[-2]
        power = math.log(last["wall_s"] / prev["wall_s"]) / math.log(last["megapixels"] / prev["megapixels"])
        estimates[f"measured growth, time ~ megapixels^{power:.2f}"] = last["wall_s"] * ratio**power
    quadratic = (last.get("breakdown") or {}).get("self_attention_s")
    if quadratic is not None:
        estimates[f"self-attention x {ratio**2:g}, the rest x {ratio:g}"] = (
            quadratic * ratio**2 + (last["wall_s"] - quadratic) * ratio
        )
    if not estimates:
        estimates[f"linear, x {ratio:g}"] = last["wall_s"] * ratio
    how = max(estimates, key=estimates.get)
    return estimates[how], how


def softmax_skip(measured: list[dict], size: int, cap: float) -> dict[str, Any] | None:
    """The "not run" fields of a softmax row at ``size`` under the time cap, or ``None`` to run it."""
    if not measured:
        return None
    last = measured[-1]
    if last["wall_s"] > cap:
        return {"reason": f"softmax at {last['size']} px took {last['wall_s']:.0f} s, over the {cap:g} s cap"}
    projected, how = project(measured, size)
    if projected > cap:
        return {
            "reason": f"projected {projected:.0f} s at {size} px ({how}, from {last['size']} px) is over the "
            f"{cap:g} s cap",
            "projected_s": projected,
        }
    return None


def profile_timed_run(series: list[dict], size: int) -> bool:
    """Whether the timed run at ``size`` can carry the profiler: the previous size's profiler cost is
    under :data:`PROFILE_SHARE` of the time projected for this one (otherwise the row runs twice)."""
    if not series or not series[-1].get("breakdown"):
        return False
    return series[-1]["breakdown"]["profiler_cost_s"] < PROFILE_SHARE * project(series, size)[0]


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """Every row in run order: each size's methods together, sizes ascending."""
    models = {"chain": CHAIN_MODEL, "dit": DIT_MODEL}
    sizes = {"chain": args.sizes, "dit": args.dit_sizes}
    return [
        (section, models[section], method, size)
        for section in args.sections
        for size in sorted(sizes[section])
        for method in METHODS[section]
    ]


def run_rows(args: argparse.Namespace, device: torch.device, journal: Journal) -> tuple[list[dict], bool]:
    """Measure the planned rows not in ``journal``; returns every planned row and whether Ctrl-C stopped it."""
    runners: dict[str, Chain | DiTStep] = {}
    rows: list[dict] = []
    jobs = plan(args)
    todo = sum(row_key(*job) not in journal.rows for job in jobs)
    overall = tqdm(total=todo, unit="row", desc="rows", position=0, disable=args.no_progress)
    bar = StageBar(not args.no_progress)
    try:
        for section, model, method, size in jobs:
            key = row_key(section, model, method, size)
            if key in journal.rows:
                rows.append(journal.rows[key])
                continue
            series = [r for r in rows if (r["section"], r["method"], r["status"]) == (section, method, "ok")]
            skip = softmax_skip(series, size, args.softmax_cap_s) if method == SOFTMAX else None
            if skip is not None:
                rows.append(
                    {"section": section, "model": model, "method": method, "size": size}
                    | {"status": "not run", **skip}
                )
                tqdm.write(f"{key}: not run: {skip['reason']}")
                overall.update(1)
                continue
            if section not in runners:
                runners[section] = (Chain if section == "chain" else DiTStep)(args, device)
            row = runners[section].run(method, size, bar, args.profile and profile_timed_run(series, size))
            journal.add(row)
            rows.append(row)
            tqdm.write(describe(row))
            overall.update(1)
    except KeyboardInterrupt:
        return rows, True
    finally:
        bar.bar.close()
        overall.close()
    return rows, False


def describe(row: dict[str, Any]) -> str:
    key = row_key(row["section"], row["model"], row["method"], row["size"])
    if row["status"] != "ok":
        return f"{key}: not run: {row['reason']}"
    line = (
        f"{key}: {row['wall_s']:.1f} s, {row['s_per_megapixel']:.1f} s/MP, peak RSS "
        f"{row['peak_rss_mib']:.0f} MiB ({row['peak_added_mib']:+.0f})"
    )
    parts = row.get("breakdown")
    if parts:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in parts["shares"].items())
        run = "this run" if parts["same_run"] else f"a profiled run of {parts['wall_s']:.1f} s"
        line += f"; {shares} ({run}, profiler saw {parts['traced_share']:.0%})"
    return line


def find(rows: list[dict], section: str, method: str, size: int) -> dict | None:
    for row in rows:
        if (row["section"], row["method"], row["size"], row["status"]) == (section, method, size, "ok"):
            return row
    return None


def ratios(rows: list[dict]) -> dict[str, list[dict]]:
    """softmax / method, of the wall time and of the peak added memory, per size where both ran."""
    out: dict[str, list[dict]] = {}
    for section, methods in METHODS.items():
        entries = []
        for size in sorted({r["size"] for r in rows if r["section"] == section}):
            base = find(rows, section, SOFTMAX, size)
            for method in methods:
                other = find(rows, section, method, size)
                if method == SOFTMAX or base is None or other is None:
                    continue
                memory = other["peak_added_mib"]
                entries.append(
                    {
                        "size": size,
                        "method": method,
                        "softmax_over_method_time": base["wall_s"] / other["wall_s"],
                        "softmax_over_method_memory": base["peak_added_mib"] / memory if memory else None,
                    }
                )
        out[section] = entries
    return out


def spreads(rows: list[dict]) -> dict[str, dict]:
    """max / min seconds per megapixel from 1024 px to the largest size run, per model and method."""
    out = {}
    for section, methods in METHODS.items():
        for method in methods:
            run = [
                r
                for r in rows
                if (r["section"], r["method"], r["status"]) == (section, method, "ok")
                and r["size"] >= TARGET_SIZES["spread_from"]
            ]
            if len(run) < 2:
                continue
            values = [r["s_per_megapixel"] for r in run]
            out[f"{section}/{run[0]['model']}/{method}"] = {
                "sizes": [r["size"] for r in run],
                "s_per_megapixel": values,
                "max_over_min": max(values) / min(values),
            }
    return out


def target(name: str, goal: str, measured: float | None, met: bool | None, note: str = "") -> dict:
    return {"target": name, "goal": goal, "measured": measured, "met": met, "note": note}


def targets(rows: list[dict], spread: dict[str, dict]) -> list[dict]:
    """The issue's targets, each beside its measured figure; ``met`` is ``None`` where it did not run."""

    def speedup(section: str, method: str, size: int) -> float | None:
        base, other = find(rows, section, SOFTMAX, size), find(rows, section, method, size)
        return base["wall_s"] / other["wall_s"] if base and other else None

    out = []
    for size, goal in ((TARGET_SIZES["chain_3x"], 3.0), (TARGET_SIZES["chain_8x"], 8.0)):
        value = speedup("chain", "linfusion", size)
        out.append(
            target(
                f"chain at {size} px: softmax time / linfusion time",
                f">= {goal:g}",
                value,
                None if value is None else value >= goal,
                "" if value is not None else "softmax or linfusion not run at this size",
            )
        )
    largest = find(rows, "chain", "linfusion", TARGET_SIZES["largest"])
    minutes = largest["wall_s"] / 60 if largest else None
    out.append(
        target("chain linfusion 8192 px: minutes", "<= 45", minutes, None if not largest else minutes <= 45)
    )
    rss = largest["peak_rss_mib"] * 2**20 / GB if largest else None
    out.append(
        target(
            "chain linfusion 8192 px: peak RSS (GB, absolute)",
            "<= 12",
            rss,
            None if not largest else rss <= 12,
        )
    )
    chain = spread.get(f"chain/{CHAIN_MODEL}/linfusion")
    complete = chain is not None and TARGET_SIZES["largest"] in chain["sizes"]
    out.append(
        target(
            "chain linfusion: max / min s per megapixel, 1024 to 8192 px",
            "<= 1.5",
            chain["max_over_min"] if chain else None,
            chain["max_over_min"] <= 1.5 if complete else None,
            "" if complete else f"sizes run: {chain['sizes'] if chain else 'fewer than two from 1024 px'}",
        )
    )
    dit_sizes = sorted({r["size"] for r in rows if r["section"] == "dit" and r["size"] >= 1024})
    for method in dit_step.VARIANTS:
        values = [speedup("dit", method, size) for size in dit_sizes]
        ran = [v for v in values if v is not None]
        out.append(
            target(
                f"dit {method}: softmax time / {method} time, lowest from 1024 px",
                ">= 1",
                min(ran) if ran else None,
                (min(ran) >= 1) if ran and len(ran) == len(values) else None,
                f"sizes: {dit_sizes}"
                if ran and len(ran) == len(values)
                else "not run at every size from 1024 px",
            )
        )
        value = speedup("dit", method, TARGET_SIZES["dit_3x"])
        out.append(
            target(
                f"dit {method} at 2048 px: softmax time / {method} time",
                ">= 3",
                value,
                None if value is None else value >= 3,
            )
        )
    return out


def verdict(met: bool | None) -> str:
    return {True: "met", False: "not met", None: "not run"}[met]


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Time and time per megapixel against megapixels (log-log), one line per model and method;
    ``None`` (with a note) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (the JSON has every number)")
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for section, methods in METHODS.items():
        for method in methods:
            run = [
                r
                for r in result["rows"]
                if (r["section"], r["method"], r["status"]) == (section, method, "ok")
            ]
            if not run:
                continue
            label = f"{run[0]['model']} {'chain' if section == 'chain' else 'step'}, {method}"
            style = "-o" if section == "chain" else "--s"
            mp = [r["megapixels"] for r in run]
            left.plot(mp, [r["wall_s"] for r in run], style, label=label)
            right.plot(mp, [r["s_per_megapixel"] for r in run], style, label=label)
    plain = matplotlib.ticker.FormatStrFormatter("%g")
    for axis, title in ((left, "wall time (s)"), (right, "seconds per megapixel")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        for ticks in (axis.xaxis, axis.yaxis):
            ticks.set_major_formatter(plain)
            ticks.set_minor_formatter(plain)
        axis.set_xlabel("megapixels")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"Cost against resolution on {result['device']} (not-run sizes left out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    """The README's table and targets from a result JSON."""
    lines = [
        "| model | method | size | time | s / MP | peak RSS (added) | attention | convolutions | VAE | overhead | softmax / this |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    speed = {
        (s, e["method"], e["size"]): e["softmax_over_method_time"]
        for s, es in result["ratios"].items()
        for e in es
    }
    for row in result["rows"]:
        head = f"| {row['model']} {row['section']} | {row['method']} | {row['size']} px"
        if row["status"] != "ok":
            lines.append(f"{head} | not run: {row['reason']} | | | | | | | |")
            continue
        parts = row.get("breakdown")
        shares = [f"{parts['shares'][c]:.0%}" for c in CATEGORIES] if parts else [""] * len(CATEGORIES)
        ratio = speed.get((row["section"], row["method"], row["size"]))
        lines.append(
            f"{head} | {row['wall_s']:.1f} s | {row['s_per_megapixel']:.2f} | "
            f"{row['peak_rss_mib']:.0f} MiB ({row['peak_added_mib']:.0f}) | {' | '.join(shares)} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    lines += ["", "| target | goal | measured | |", "|---|---|---|---|"]
    for t in result["targets"]:
        value = "" if t["measured"] is None else f"{t['measured']:.2f}"
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {verdict(t['met'])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="chain sizes (px; default 512 1024 2048 4096 8192)"
    )
    parser.add_argument("--dit-sizes", type=int, nargs="+", help="DiT step sizes (px; default 512 1024 2048)")
    parser.add_argument("--steps", type=int, help=f"chain num_inference_steps (default {DEFAULT_STEPS})")
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help="chain guidance scale (%(default)s)"
    )
    parser.add_argument(
        "--softmax-cap-s", type=float, default=1800.0, help="time cap of a softmax run, seconds (%(default)s)"
    )
    parser.add_argument("--pixart-blocks", type=int, default=4, help="PixArt blocks (PixArt-Sigma has 28)")
    parser.add_argument("--dit-repeats", type=int, default=1, help="timed DiT steps per row (median)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="no time breakdown")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: the chain as saved (float32), the DiT bfloat16 on CUDA and float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--contended", action="store_true", help="record that other jobs shared the machine")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="chain and DiT at 256 and 512 px, 10 chain steps (flags given win)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard the rows of earlier runs and start over"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--markdown", action="store_true", help="print the README table from the JSON (--out) and run nothing"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default bench/results/scaling-<device>[-quick].json)",
    )
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    quick = {"sizes": [256, 512], "dit_sizes": [256, 512], "steps": 10}  # what --quick changes
    full = {"sizes": [512, 1024, 2048, 4096, 8192], "dit_sizes": [512, 1024, 2048], "steps": DEFAULT_STEPS}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [s for s in [*args.sizes, *args.dit_sizes] if s <= 0 or s % dit_step.PIXELS_PER_TOKEN]
    if bad:
        parser.error(
            f"--sizes and --dit-sizes must be positive multiples of {dit_step.PIXELS_PER_TOKEN} px, got {bad}"
        )
    if args.steps < 1 or args.dit_repeats < 1 or args.pixart_blocks < 1:
        parser.error("--steps, --dit-repeats and --pixart-blocks must be at least 1")
    if args.softmax_cap_s <= 0:
        parser.error(f"--softmax-cap-s must be positive, got {args.softmax_cap_s}")
    return args


def settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What a row's figures depend on besides its key; rows of a journal must share them."""
    return {
        "device": device_label(device),
        "dtype": args.dtype,
        "profile": args.profile,
        "chain": {
            "prompt": PROMPT,
            "seed": SEED,
            "steps": args.steps,
            "guidance": args.guidance,
            # the chain's default plan to 8192 px: stage sizes, SDEdit strengths and guidance
            "stages": [height for height, _ in plan_stages(8192, 8192, 128)],
            "strengths": default_strengths(plan_stages(8192, 8192, 128)),
            "sdedit_guidance_scale": "auto",
            "vae": "per stage: tiled by free memory; local attention and bfloat16 (CPU) above 1024 px",
        },
        "dit": {"pixart_blocks": args.pixart_blocks, "repeats": args.dit_repeats, "batch": 1},
    }


def summarize(rows: list[dict], args: argparse.Namespace, device: torch.device, complete: bool) -> dict:
    spread = spreads(rows)
    return {
        "benchmark": "scaling",
        "description": __doc__.split("\n\n")[0],
        "environment": environment(),
        "device": device_label(device),
        "contended": args.contended,
        "argv": args.argv,
        "config": settings(args, device)
        | {
            "sizes": args.sizes,
            "dit_sizes": args.dit_sizes,
            "softmax_cap_s": args.softmax_cap_s,
            "profiler_cost_per_event_us": profiler_cost_per_event() * 1e6 if args.profile else None,
            "chain": "lindiff render's path (Renderer, HighResPipeline above 128 px, default strengths, "
            "tile_vae='auto'); linfusion = the tiny-shapes-linfusion asset",
            "dit_config": dit_step.model_config(DIT_MODEL, args),
            "dit_variants": dit_step.VARIANTS,
        },
        "categories": CATEGORIES,
        "complete": complete,
        "rows": rows,
        "ratios": ratios(rows),
        "s_per_megapixel_spread": spread,
        "targets": targets(rows, spread),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = f"scaling-{device_label(device, short=True)}{'-quick' if args.quick else ''}.json"
    path = args.out or RESULTS / name
    if args.markdown:
        print(markdown(json.loads(path.read_text())))
        return {}
    if device.type != "cpu" and args.profile:
        print("breakdown: CPU only, measuring without it on", device)
        args.profile = False
    journal = Journal(path.with_suffix(".jsonl"), settings(args, device), args.fresh)
    if journal.rows:
        print(f"resuming: {len(journal.rows)} finished row(s) in {journal.path}")
    rows, interrupted = run_rows(args, device, journal)
    result = summarize(rows, args, device, complete=not interrupted)
    result["interrupted"] = interrupted
    save_results(result, path)
    png = plot(result, path.with_suffix(".png"))
    print(markdown(result))
    print(f"saved {path}" + (f" and {png.name}" if png else ""))
    if interrupted:
        print(f"interrupted; the finished rows are in {journal.path}: run the same command to go on")
    return result


if __name__ == "__main__":
    sys.exit(130 if main().get("interrupted") else 0)
