"""The ``lindiff`` command: a thin layer over the public API.

    lindiff info              versions, devices and kernel backends of this installation
    lindiff info IMAGE.png    the generation parameters stored in a PNG (or MP4) that lindiff rendered
    lindiff methods           the registered attention methods and their options
    lindiff distill MODEL     distil MODEL's denoiser into its linear-attention student
                              (``accelerate launch -m lindiff.cli distill ...`` for several GPUs)
    lindiff render            render prompts to PNGs (videos: MP4s and poster PNGs) that carry their
                              parameters; resumable
                              (``accelerate launch -m lindiff.cli render ...`` for several GPUs;
                              ``torchrun --nproc-per-node N -m lindiff.cli render --parallel-degree N``
                              splits every image over N GPUs)
    lindiff demo              the Gradio web demo (needs the ``demo`` extra), on 127.0.0.1:7860

Each sub-command is one function taking the parsed arguments; ``main`` returns the exit code:
0 on success, 2 for a user error (printed as ``lindiff COMMAND: error: ...``, no traceback),
3 when rendering runs out of memory, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import platform
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .adapters import families
from .attention import METHODS, methods
from .version import __version__

DEPENDENCIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "triton", "gradio")
THIRD_PARTY_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed)",
}
"""Logger -> text of warnings the command hides: about optional packages of other libraries that
rendering with lindiff does not use (transformers' image processors without torchvision)."""


class _DropMessages(logging.Filter):
    """Drops the records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_third_party() -> None:
    """Hide :data:`THIRD_PARTY_NOISE` (only those records; every other warning, lindiff's included, stays)."""
    for name, text in THIRD_PARTY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessages(text))


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What this installation can run: versions, accelerator and kernel backends."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "lindiff": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _installed_version(name) for name in DEPENDENCIES},
        "cuda": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "linear_attention_backend": "triton" if cuda and _installed_version("triton") else "reference",
        "methods": methods(),
        "families": families(),
    }


def method_options(name: str) -> dict[str, object]:
    """Option names of method ``name`` with their defaults."""
    options_cls = METHODS.get(name).options_cls
    return {field.name: field.default for field in dataclasses.fields(options_cls)}


def _user_error(command: str, message: object, code: int = 2) -> int:
    print(f"lindiff {command}: error: {message}", file=sys.stderr)
    return code


def run_info(args: argparse.Namespace) -> int:
    if args.image is not None:
        return _image_info(args.image, args.json)
    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    print(f"lindiff {env['lindiff']} (Python {env['python']}, {env['platform']})")
    for name, version in env["packages"].items():
        print(f"  {name:<13} {version or 'not installed'}")
    print(f"  CUDA devices  {', '.join(env['devices']) or 'none'}")
    print(f"  linear attention backend: {env['linear_attention_backend']}")
    print(f"  methods: {', '.join(env['methods'])}; model families: {', '.join(env['families'])}")
    return 0


def _image_info(image: str, as_json: bool) -> int:
    from .pipelines.metadata import read_params
    from .pipelines.video import MissingVideoWriter

    try:
        params = read_params(image)
    except (ValueError, FileNotFoundError, MissingVideoWriter) as error:
        return _user_error("info", error)
    if as_json:
        print(json.dumps(params, indent=2, ensure_ascii=False))
        return 0
    width = max(map(len, params))
    for key, value in params.items():
        print(f"{key:<{width}}  {'' if value is None else value}")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    table = {name: method_options(name) for name in methods()}
    if args.json:
        print(json.dumps(table, indent=2, default=repr))
        return 0
    for name, options in table.items():
        listed = ", ".join(f"{key}={value!r}" for key, value in options.items())
        print(f"{name}: {listed or 'no options'}")
    return 0


def _parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (``64``, ``null``, ``1e-4``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~lindiff.distill.DistillConfig` field, from its type and ``help``."""
    from .distill.config import DistillConfig

    hints = typing.get_type_hints(DistillConfig)
    for field in dataclasses.fields(DistillConfig):
        if field.name == "model":
            parser.add_argument("model", help=field.metadata["help"])
            continue
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args and typing.get_origin(hint) is not list else hint
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"help": field.metadata["help"], "default": argparse.SUPPRESS}
        if typing.get_origin(hint) is dict:
            kwargs.update(action="append", type=_parse_option, metavar="KEY=VALUE")
        elif base is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is list:
            kwargs["nargs"] = "+"
            item = typing.get_args(hint)[0]
            if item in (int, float):
                kwargs["type"] = item
        else:
            convert = base if base in (int, float) else str
            kwargs["type"] = _optional(convert) if type(None) in typing.get_args(hint) else convert
            kwargs["choices"] = field.metadata.get("choices")
        if field.name == "output_dir":
            kwargs.update(required=True, default=None)
        parser.add_argument(flag, dest=field.name, **kwargs)


def run_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill
    from .distill.components import SetupError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lindiff").setLevel(logging.INFO)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    if "method_options" in options:
        options["method_options"] = dict(options["method_options"])
    try:
        config = DistillConfig(**options)
    except (ValueError, TypeError) as error:  # the options, checked before anything loads
        return _user_error("distill", error)
    try:
        result = distill(config)
    except SetupError as error:  # the options do not fit the pipeline or the output folder
        return _user_error("distill", error)
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint saved in {result.output_dir}; rerun with --resume")
        return 130
    print(f"distilled weights: {result.weights}")
    return 0


REPRODUCED_FLAGS = {
    "negative_prompt": "--negative-prompt",
    "method": "--method",
    "size": "--size",
    "width": "--width",
    "height": "--height",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "highres": "--highres",
    "stages": "--stages",
    "strengths": "--strengths",
    "frames": "--frames",
}
"""``render`` flags whose value ``--reproduce`` takes from the PNG or MP4 (so they may not be given with it)."""


def _size(text: str) -> tuple[int, int]:
    from .pipelines.prompts import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _stages(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) > 0):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}")


def run_render(args: argparse.Namespace) -> int:
    import torch

    from .pipelines.batch import summary_table
    from .pipelines.render import RenderConfig, render
    from .pipelines.video import MissingVideoWriter

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "no_progress")}
    given = [flag for name, flag in REPRODUCED_FLAGS.items() if options[name] is not None]
    if args.reproduce and given:
        return _user_error(
            "render",
            f"{', '.join(given)} cannot be used with --reproduce, which takes them from the PNG or MP4",
        )
    try:
        config = RenderConfig(**{k: v for k, v in options.items() if v is not None})
        result = render(config, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError, NotImplementedError, MissingVideoWriter) as error:
        return _user_error("render", error)
    except (torch.OutOfMemoryError, MemoryError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return _user_error(
            "render",
            f"out of memory ({first_line}); try --tile (tiled VAE decoding), --offload (model CPU "
            "offload), --dtype fp16 or bf16, or a smaller --size",
            code=3,
        )
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if result.split_over > 1 and result.process_index != 0:
        return 130 if result.interrupted else 0  # the main process reports for all of them
    if result.removed:
        print(f"removed {len(result.removed)} partial file(s) of an interrupted run", file=sys.stderr)
    print(summary_table(result))
    if result.interrupted:
        print(f"interrupted; run the same command again to resume ({result.manifest})", file=sys.stderr)
        return 130
    if result.process_index == 0:
        print(f"images and {result.manifest.name} in {result.manifest.parent}")
    return 0


def _add_render_flags(parser: argparse.ArgumentParser) -> None:
    from .pipelines.batch import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from .pipelines.prompts import ON_ERROR

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt; repeat the flag for several")
    source.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompt file: text with one prompt per line, or .jsonl with prompt and optional "
        "negative, seed, size (N, 'WxH' or [W, H]), width, height per row",
    )
    source.add_argument(
        "--reproduce",
        metavar="FILE",
        help="render a PNG (or a video's MP4 or poster PNG) written by lindiff again from its stored "
        "parameters (--model/--weights override the recorded ones)",
    )
    parser.add_argument("--out", default="renders", help="output folder (default: %(default)s)")
    parser.add_argument("--negative-prompt", help="negative prompt of rows without their own")
    parser.add_argument(
        "--model",
        help="diffusers folder or hub id (default: the embedded tiny-shapes model; with --frames its video "
        "model, tiny-shapes-motion)",
    )
    parser.add_argument(
        "--method",
        help=f"attention method, one of {', '.join(methods())}, or softmax for the model's own "
        "(default: linfusion)",
    )
    parser.add_argument("--weights", help="weights for --method: file, folder or hub id")
    parser.add_argument("--size", type=_size, help="N or WxH pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="width in pixels (overrides --size)")
    parser.add_argument("--height", type=int, help="height in pixels (overrides --size)")
    parser.add_argument(
        "--frames",
        type=int,
        help="frames of each video, for a video pipeline (Wan, CogVideoX: 4k + 1; LTX-Video: 8k + 1; "
        "AnimateDiff: any count up to its motion modules' length); "
        "writes an H.264 MP4 and a poster PNG per prompt (needs pip install 'lindiff[video]'; "
        "default: the pipeline's own)",
    )
    parser.add_argument(
        "--fps", type=float, help="frame rate of the videos (default: the model family's, e.g. 16 for Wan)"
    )
    parser.add_argument("--steps", type=int, help=f"denoising steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, help=f"guidance scale (default: {DEFAULT_GUIDANCE})")
    parser.add_argument(
        "--seed", type=int, help="base seed; a row without its own seed gets seed + row index (default: 0)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="model dtype (default: as saved)")
    parser.add_argument(
        "--highres",
        action=argparse.BooleanOptionalAction,
        help="use the multi-stage high-resolution pipeline (default: when the size exceeds the model's native size)",
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        help="high-resolution stages: auto (the first SDEdit stage up to 4x the native side, then 2x per "
        "stage) or a number (geometric from the native size; default: auto)",
    )
    parser.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        metavar="S",
        help="SDEdit strengths of high-resolution stages 2, 3, ... (default: by each stage's scale over "
        "the native size, 0.4 up to 2x, 0.3 up to 4x, 0.2 up to 8x, 0.1 above, which fits any size)",
    )
    parser.add_argument(
        "--tile",
        action=argparse.BooleanOptionalAction,
        help="tiled VAE decoding (less memory at large sizes; default: in the high-resolution chain when "
        "an untiled pass would take over half the free memory)",
    )
    parser.add_argument("--offload", action="store_true", help="model CPU offload (less GPU memory, slower)")
    parser.add_argument(
        "--parallel-degree",
        type=int,
        metavar="N",
        help="split every image over N processes by tokens (context parallelism, for models with a "
        "sequence plan in diffusers, such as FLUX; not UNets): launch with torchrun --nproc-per-node N "
        "-m lindiff.cli render ...; process 0 writes the images (default: 1, each process renders its "
        "share of the batch)",
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="abort",
        help="what to do with malformed prompt-file lines (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _lora(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER_OR_HUB_ID, got {text!r}")
    return name, source


def run_demo(args: argparse.Namespace) -> int:
    try:
        from .app import create_model, launch
    except ImportError as error:
        return _user_error("demo", f"{error}; install the demo extra: pip install 'lindiff[demo]'")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.video and args.model:
        return _user_error(
            "demo",
            "--video selects the embedded video model; drop it with --model (a model renders videos if it is a video pipeline)",
        )
    try:
        model = create_model(
            args.model,
            weights=args.weights,
            device=args.device,
            dtype=args.dtype,
            controlnet=args.controlnet,
            loras=dict(args.loras) if args.loras else None,
            output_dir=args.output_dir,
            max_size=args.max_size,
            video=args.video,
        )
    except (ValueError, FileNotFoundError) as error:
        return _user_error("demo", error)
    launch(model, host=args.host, port=args.port, share=args.share)
    return 0


def _add_demo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="diffusers folder or hub id (default: the embedded tiny-shapes model, its ControlNet and LoRA)",
    )
    parser.add_argument(
        "--video",
        action="store_true",
        help="without --model: the embedded video model (tiny-shapes with its motion adapter), in the video tab",
    )
    parser.add_argument("--weights", help="weights of the linear student: file, folder or hub id")
    parser.add_argument("--controlnet", help="ControlNet folder or hub id offered as a condition")
    parser.add_argument(
        "--lora",
        dest="loras",
        action="append",
        type=_lora,
        metavar="NAME=SOURCE",
        help="a LoRA to offer; repeatable",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="model dtype (default: as saved)")
    parser.add_argument(
        "--max-size", type=int, help="largest image side in pixels (default: 16384 on GPU, 4096 on CPU)"
    )
    parser.add_argument("--output-dir", help="where PNGs are written (default: a new temporary folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lindiff", description="Linear-time attention for pretrained diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"lindiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="versions, devices and backends, or a rendered PNG's parameters")
    info.add_argument("image", nargs="?", metavar="IMAGE.png", help="show the parameters stored in this PNG")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=run_info)

    listing = commands.add_parser("methods", help="the attention methods and their options")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    listing.set_defaults(run=run_methods)

    training = commands.add_parser(
        "distill",
        help="distil a pipeline's denoiser into its linear-attention student",
        description="Distil a pipeline's denoiser into its linear-attention student "
        "(teacher-student training on accelerate; resumable). Flags map onto lindiff.distill.DistillConfig.",
    )
    _add_config_flags(training)
    training.set_defaults(run=run_distill)

    rendering = commands.add_parser(
        "render",
        help="render prompts to PNGs that carry their parameters (resumable batches)",
        description="Render prompts to PNGs that carry their generation parameters. Batches are "
        "resumable: a manifest records each finished image and re-running skips them. "
        "`accelerate launch -m lindiff.cli render ...` splits the prompts between processes; with "
        "--parallel-degree N, `torchrun --nproc-per-node N -m lindiff.cli render ...` splits every image. "
        "Exit codes: 2 for user errors, 3 for out of memory, 130 when interrupted.",
    )
    _add_render_flags(rendering)
    rendering.set_defaults(run=run_render)

    demo = commands.add_parser(
        "demo",
        help="the Gradio web demo: render, compare softmax and linear attention, see time and memory",
    )
    _add_demo_flags(demo)
    demo.set_defaults(run=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lindiff`` console script; returns the process exit code."""
    quiet_third_party()
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
