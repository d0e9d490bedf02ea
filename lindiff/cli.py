"""The ``lindiff`` command: a thin layer over the public API.

    lindiff info              versions, devices and kernel backends of this installation
    lindiff methods           the registered attention methods and their options
    lindiff distill MODEL     distil MODEL's denoiser into its linear-attention student
                              (``accelerate launch -m lindiff.cli distill ...`` for several GPUs)

Each sub-command is one function taking the parsed arguments; ``main`` returns the exit code.
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


def run_info(args: argparse.Namespace) -> int:
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
        else:
            convert = base if base in (int, float) else str
            kwargs["type"] = _optional(convert) if type(None) in typing.get_args(hint) else convert
            kwargs["choices"] = field.metadata.get("choices")
        if field.name == "output_dir":
            kwargs.update(required=True, default=None)
        parser.add_argument(flag, dest=field.name, **kwargs)


def run_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lindiff").setLevel(logging.INFO)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    if "method_options" in options:
        options["method_options"] = dict(options["method_options"])
    result = distill(DistillConfig(**options))
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint saved in {result.output_dir}; rerun with --resume")
        return 130
    print(f"distilled weights: {result.weights}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lindiff", description="Linear-time attention for pretrained diffusion models."
    )
    parser.add_argument("--version", action="version", version=f"lindiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="versions, devices and kernel backends")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lindiff`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
