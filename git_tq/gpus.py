"""The machine's GPUs: which ids exist, and which processes sit on each.

`git config tq.gpus 0,1` declares virtual GPUs (ids that only set
CUDA_VISIBLE_DEVICES); this is how GPU-less machines and tests work, and it
overrides NVML. Otherwise NVML (nvidia-ml-py) is asked, when installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from git_tq.errors import BadSpec
from git_tq.model import GpuRequest


def parse_gpu_ids(text: str) -> tuple[int, ...]:
    """`0,1` or `0 1` -> (0, 1); raises BadSpec on anything else."""
    items = [x for x in text.replace(" ", ",").split(",") if x]
    try:
        ids = tuple(int(x) for x in items)
    except ValueError:
        raise BadSpec(f"bad GPU list {text!r}: give ids like 0 or 0,1") from None
    if not ids or any(i < 0 for i in ids):
        raise BadSpec(f"bad GPU list {text!r}: give ids like 0 or 0,1")
    if len(set(ids)) != len(ids):
        raise BadSpec(f"GPU list {text!r} names a GPU twice")
    return ids


@contextlib.contextmanager
def nvml() -> Iterator[Any]:
    """The pynvml module, initialised, or None when NVML or its driver is absent."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def nvml_gpu_ids() -> Optional[tuple[int, ...]]:
    """GPU indices from NVML, or None when NVML or its driver is absent."""
    with nvml() as lib:
        if lib is None:
            return None
        try:
            return tuple(range(int(lib.nvmlDeviceGetCount())))
        except Exception:
            return None


def machine_gpus(config: Mapping[str, str]) -> tuple[int, ...]:
    """The GPU ids jobs may use on this machine (possibly none)."""
    declared = config.get("tq.gpus")
    if declared is not None:
        if declared.strip().lower() in ("", "none"):
            return ()
        try:
            return parse_gpu_ids(declared)
        except BadSpec as exc:
            raise BadSpec(f"git config tq.gpus: {exc}") from None
    return nvml_gpu_ids() or ()


def check_request(request: GpuRequest, available: tuple[int, ...]) -> None:
    """Refuse a request this machine can never satisfy."""
    if request.cpu_only:
        return
    if not available:
        raise BadSpec(
            "this machine has no GPUs (NVML found none and tq.gpus is not set): "
            "submit with --cpu, or declare GPUs with `git config tq.gpus 0,1`"
        )
    if request.ids is not None:
        missing = [i for i in request.ids if i not in available]
        if missing:
            have = ",".join(map(str, available))
            raise BadSpec(
                f"no GPU {','.join(map(str, missing))} on this machine (GPUs: {have})"
            )
    elif request.count > len(available):
        raise BadSpec(
            f"asked for {request.count} GPUs, this machine has {len(available)}"
        )


def gpu_processes(environ: Mapping[str, str]) -> dict[int, list[int]]:
    """Compute processes per GPU: from NVML, or from the JSON file named by
    $TQ_GPU_PROBE_FILE (`{"0": [pid, ...]}`), the one seam tests and GPU-less
    machines use to stand in for NVML."""
    probe_file = environ.get("TQ_GPU_PROBE_FILE")
    if probe_file:
        import json

        try:
            with open(probe_file, encoding="utf-8") as fh:
                data = json.load(fh)
            return {int(k): [int(p) for p in v] for k, v in data.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}
    with nvml() as lib:
        if lib is None:
            return {}
        try:
            return {i: [int(p.pid) for p in lib.nvmlDeviceGetComputeRunningProcesses(
                        lib.nvmlDeviceGetHandleByIndex(i))]
                    for i in range(int(lib.nvmlDeviceGetCount()))}
        except Exception:
            return {}


def gpu_details() -> dict[int, dict[str, object]]:
    """Name, utilisation and memory per GPU from NVML ({} without NVML)."""
    with nvml() as lib:
        if lib is None:
            return {}
        try:
            result: dict[int, dict[str, object]] = {}
            for i in range(int(lib.nvmlDeviceGetCount())):
                h = lib.nvmlDeviceGetHandleByIndex(i)
                name = lib.nvmlDeviceGetName(h)
                util = lib.nvmlDeviceGetUtilizationRates(h)
                mem = lib.nvmlDeviceGetMemoryInfo(h)
                result[i] = {"name": name.decode() if isinstance(name, bytes) else str(name),
                             "util": int(util.gpu), "mem_used": int(mem.used),
                             "mem_total": int(mem.total)}
            return result
        except Exception:
            return {}
