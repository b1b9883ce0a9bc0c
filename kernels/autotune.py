"""Launch-config choice per shape: timed once per GPU, cached in memory and on disk.

Each kernel family gives a short list of candidate configs for a shape (a pruned space, its
default first; a candidate may also be "use the torch / cuBLAS op instead", so the measurement,
not taste, decides where a Triton kernel pays). The first launch of a new (GPU name, Triton
version, kernel, shape key, candidate list) times every candidate and keeps the fastest; the choice is written to
a JSON file so later processes skip the timing:

  $SAMHQ_FAST_CACHE_DIR/autotune.json   (default ~/.cache/samhq_fast/autotune.json)

Every candidate of the four families compiles offline for sm_90 (Hopper) with Triton 3.6 and 3.9, with
the divisibility specializations of a real launch, within the 227 KiB shared-memory limit (the
largest takes 176 KiB); one that fails on some other GPU is skipped by `pick`, not fatal.

SAMHQ_FAST_AUTOTUNE=0 (or "false", "no", "off") skips the timing and uses each family's default. Nothing is timed in the
Triton interpreter (its timings mean nothing) or while a CUDA graph is being captured (timing
syncs): there a shape this process has already timed keeps its choice, any other gets the default,
which is not cached. A default this GPU cannot launch (too much shared memory for it: consumer GPUs
of compute capability 8.6 / 8.9 have 99 KiB a block, Hopper 227 KiB) is passed over for the next
candidate in the list (`run`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

from samhq_fast.switches import env_flag, triton_interpreter_on

CACHE_DIR_ENV = "SAMHQ_FAST_CACHE_DIR"
AUTOTUNE_ENV = "SAMHQ_FAST_AUTOTUNE"
CACHE_FILE = "autotune.json"

_chosen: dict[tuple, dict] = {}  # (device, kernel, shape key) -> timed choice, this process
_untuned: dict[tuple, dict] = {}  # (device, kernel, shape key) -> first candidate that launched untimed


def cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "samhq_fast"
    return Path(root) / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring the unreadable autotune cache {path} ({e}); configs will be timed again", stacklevel=3)
        return {}
    if not isinstance(entries, dict):
        warnings.warn(f"ignoring the autotune cache {path}: not a JSON object; configs will be timed again", stacklevel=3)
        return {}
    return entries


def _write_cache(path: Path, key: str, config: dict) -> None:
    """Merge one entry into the file (re-read first: other processes may have added theirs), atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries[key] = config
        # One temporary file per writer (threads of one process too), so writers never share one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):  # the replace failed (e.g. the cache path is a folder)
                os.unlink(tmp)
    except OSError as e:  # a read-only home must not break inference: the choice stays in memory
        warnings.warn(f"could not write the autotune cache {path} ({e}); the choice is kept for this process only", stacklevel=3)


def file_key(device_name: str, kernel: str, shape_key: tuple, candidates: list[dict]) -> str:
    """The disk cache's key. It names the candidate list by a digest: a release that offers other
    candidates (a new kernel, other tiles) times them again instead of keeping an older choice that
    is still among them."""
    digest = hashlib.sha1(json.dumps(candidates, sort_keys=True).encode()).hexdigest()[:10]
    return f"{device_name} | triton {triton.__version__} | {kernel} | {'/'.join(map(str, shape_key))} | candidates {digest}"


def tuning_enabled(device: torch.device) -> bool:
    if not env_flag(AUTOTUNE_ENV, default=True) or triton_interpreter_on():
        return False
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def pick(kernel: str, shape_key: tuple, candidates: list[dict], time_ms: Callable[[dict], float], device: torch.device) -> dict:
    """The fastest of `candidates` (JSON-able dicts, default first) for this kernel and shape: this
    process's choice, else the disk cache's, else timed now (and cached in both).

    time_ms(config) -> milliseconds for one launch with that config (it may raise, e.g. Triton's
    OutOfResources when a tile does not fit: that candidate is skipped).
    """
    memory_key = (device, kernel, shape_key)
    if memory_key in _chosen:
        return _chosen[memory_key]
    path, key = cache_path(), file_key(device_name(device), kernel, shape_key, candidates)
    cached = _read_cache(path).get(key)
    # The entry picks one of the candidates, whose own values are launched (a hand-edited 64.0 or 1
    # compares equal to 64 or True); a stale entry (a config no longer offered) is timed again.
    chosen = next((config for config in candidates if config == cached), None)
    if chosen is not None:
        _chosen[memory_key] = chosen
        return chosen
    timings, errors = [], []
    for config in candidates:
        try:
            timings.append((time_ms(config), config))
        except Exception as e:  # noqa: BLE001  (any failure rules the candidate out; it is reported if all fail)
            errors.append(f"{config}: {type(e).__name__}: {e}")
    if not timings:
        raise RuntimeError(f"{kernel}: every candidate config failed for shape {shape_key}:\n" + "\n".join(errors))
    best = min(timings, key=lambda t: t[0])[1]
    _chosen[memory_key] = best
    _write_cache(path, key, best)
    return best


def run(kernel: str, shape_key: tuple, candidates: list[dict], launch: Callable[[dict], object], device: torch.device):
    """launch(config) with this shape's config; returns what launch returns.

    Tuned (see tuning_enabled): the fastest candidate, timed on first use (see pick). Untuned: the
    timed choice if this process has one, else the default, or the first candidate after it that
    this GPU can launch. Triton raises OutOfResources (shared memory, registers) before anything is
    queued, so trying the next is safe, in a CUDA graph capture too.
    """
    memory_key = (device, kernel, shape_key)
    if memory_key in _chosen or tuning_enabled(device):
        return launch(pick(kernel, shape_key, candidates, lambda c: bench_ms(lambda: launch(c)), device))
    errors = []
    for config in candidates[candidates.index(_untuned.get(memory_key, candidates[0])):]:
        try:
            result = launch(config)
        except OutOfResources as e:
            errors.append(f"{config}: {e}")
            continue
        _untuned[memory_key] = config
        return result
    raise RuntimeError(f"{kernel}: no candidate config fits this GPU for shape {shape_key}:\n" + "\n".join(errors))


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the GPU (short warm-up and repeat: a candidate costs ~30 ms
    plus its compile, so a kernel family's first call at a new shape stays in seconds)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
