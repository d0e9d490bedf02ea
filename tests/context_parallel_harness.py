"""Two gloo processes that run a test module's ``CASES`` and record their results (shared by the
context-parallel tests).

Each case runs in both processes under ``torch.accelerator.device_count() == 1``: diffusers 0.42's
``enable_parallelism`` divides the rank by the accelerator count, which is 0 on a CPU-only
machine (test code only; the library has its own contained workaround). Rank 0 writes every
case's result, or the error it raised, as JSON.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, module: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        for name, case in importlib.import_module(module).CASES.items():
            torch.manual_seed(0)
            try:
                results[name] = case()
            except Exception as error:  # recorded for the test that expects or reports it
                results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
            dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def run_cases(module: str, folder: Path) -> dict[str, Any]:
    """Run ``module.CASES`` in :data:`WORLD` processes; the result (or error) of each case by name."""
    out = folder / "results.json"
    mp.spawn(_worker, args=(free_port(), module, str(out)), nprocs=WORLD, join=True)
    return json.loads(out.read_text())


def ok(results: dict[str, Any], name: str) -> dict[str, Any]:
    """The result of case ``name``, failing the test with the case's traceback if it raised."""
    result = results[name]
    assert "error" not in result, result.get("trace")
    return result
