"""``precision=auto`` and the batch size chosen by measurement, on this machine for this model.

At start the label program runs a few batches of the model, in each candidate precision, on
random inputs of the model's input size, and keeps the fastest: fp16 (the card's arithmetic) or
bf16 on CUDA; fp32, fp16 or bf16 on the CPU, whatever the CPU's flags say. A candidate closer to
the card's arithmetic (CUDA: fp16, then bf16; CPU: fp32, then fp16, then bf16) is kept unless
another is at least ``MARGIN`` times as fast, so noise cannot flip the choice. On CUDA without a
``batch_size``, the batch is the largest power of two up to ``MAX_BATCH`` whose memory, measured
at two small batches and extrapolated, fits ``MEMORY_SHARE`` of the device's, and that then runs;
on the CPU it is ``DEFAULT_BATCH["cpu"]`` (larger batches bought nothing there).

The choice is cached per machine and model (``<checkpoint cache>/calibration/<digest>.json``) and
the first one written stays: precision is part of the labeler's fingerprint, so every run on a
machine labels with the same labeler (set ``precision`` for runs that span machine kinds). The
label run's metadata says what was chosen, the figures, and why. Imports no ``dagster``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from coyo_platform.label.settings import DEFAULT_BATCH

VERSION = 1
#: A faster candidate replaces a more faithful one only at this speed ratio or more.
MARGIN = 1.10
#: Timed batches per candidate (after one warm-up batch), and the batch they run on the CPU.
TIMED_BATCHES = 2
CPU_CALIBRATION_BATCH = 4
MAX_BATCH = 512
MEMORY_SHARE = 0.8
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
#: Candidates, the most faithful to the card's arithmetic first.
CANDIDATES = {"cuda": ("fp16", "bf16"), "cpu": ("fp32", "fp16", "bf16")}


@dataclass
class Calibration:
    precision: str  # fp16 | bf16 | fp32
    batch_size: int
    why: str
    images_per_second: dict[str, float] = field(default_factory=dict)  # per candidate
    machine: str = ""
    cached: bool = False
    version: int = VERSION

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.precision]


def machine(device: torch.device) -> str:
    """What decides the figures: the device's name (GPU) or CPU model, cores and threads, and
    torch's version."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory // 2**20} MiB"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                name = next(
                    (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name
                )
        except OSError:
            pass
        name = f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"{device.type}: {name}; torch {torch.__version__}"


def _key(device: torch.device, model: str, weights: str, size: tuple, step: dict) -> str:
    value = json.dumps([VERSION, machine(device), model, weights, list(size), step], default=str)
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _rate(run, batch: int, dtype: torch.dtype | None, device: torch.device) -> float:
    """Images per second of ``run(batch, dtype)`` after one warm-up batch."""
    run(batch, dtype)
    _sync(device)
    start = time.perf_counter()
    for _ in range(TIMED_BATCHES):
        run(batch, dtype)
    _sync(device)
    return TIMED_BATCHES * batch / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick(rates: dict[str, float], order: tuple[str, ...]) -> tuple[str, str]:
    """The candidate to use and why: the most faithful one, unless another is at least
    ``MARGIN`` times as fast (then the fastest)."""
    fastest = max(rates, key=rates.__getitem__)
    figures = ", ".join(f"{p} {rates[p]:,.1f} img/s" for p in order if p in rates)
    first = next(p for p in order if p in rates)
    if fastest != first and rates[fastest] >= MARGIN * rates[first]:
        return fastest, f"{fastest}: the fastest measured ({figures})"
    ratio = rates[fastest] / rates[first]
    return first, (
        f"{first}: the closest to the card's arithmetic, and no other is {MARGIN:g}x as fast "
        f"({figures}; best/{first} {ratio:.2f})"
    )


def _largest_batch(run, device: torch.device, dtype: torch.dtype | None) -> tuple[int, str]:
    """CUDA: the largest power-of-two batch that fits, from the memory two small batches took."""
    peaks = {}
    for b in (8, 16):
        torch.cuda.reset_peak_memory_stats(device)
        run(b, dtype)
        _sync(device)
        peaks[b] = torch.cuda.max_memory_allocated(device)
    per_image = max(1, (peaks[16] - peaks[8]) // 8)
    base = peaks[8] - 8 * per_image
    total = torch.cuda.get_device_properties(device).total_memory
    batch = 16
    while batch * 2 <= MAX_BATCH and base + per_image * batch * 2 <= MEMORY_SHARE * total:
        batch *= 2
    while batch > 16:
        try:
            run(batch, dtype)  # it really runs
            _sync(device)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    why = (
        f"batch {batch}: the largest power of two up to {MAX_BATCH} within {MEMORY_SHARE:.0%} of "
        f"{total / 2**30:.0f} GiB ({per_image / 2**20:.0f} MiB an image measured)"
    )
    return batch, why


def calibrate(
    run, device: torch.device, precision: str, batch_size: int | None
) -> tuple[str, int, dict[str, float], str]:
    """Measure: (precision, batch size, img/s per precision candidate, why). ``run(batch,
    dtype)`` runs the model once on a batch of random inputs."""
    reasons = []
    if batch_size is not None:
        batch = batch_size
    elif device.type == "cuda":
        first = DTYPES[CANDIDATES["cuda"][0] if precision == "auto" else precision]
        batch, why = _largest_batch(run, device, first)
        reasons.append(why)
    else:
        batch = DEFAULT_BATCH["cpu"]
        reasons.append(f"batch {batch}: the CPU default (larger batches measured no faster)")
    rates: dict[str, float] = {}
    if precision == "auto":
        order = CANDIDATES["cuda" if device.type == "cuda" else "cpu"]
        timed = batch if device.type == "cuda" else min(batch, CPU_CALIBRATION_BATCH)
        with torch.inference_mode():
            rates = {p: _rate(run, timed, DTYPES[p], device) for p in order}
        precision, why = pick(rates, order)
        reasons.insert(0, why)
    return precision, batch, rates, "; ".join(reasons)


def cached(
    folder: str,
    device: torch.device,
    model: str,
    weights: str,
    size: tuple,
    step: dict[str, Any],
    measure,
) -> Calibration:
    """The calibration recorded for this machine and model, or ``measure()``'s, recorded (the
    first record written stays: a concurrent run's is not overwritten)."""
    path = os.path.join(folder, "calibration", f"{_key(device, model, weights, size, step)}.json")
    try:
        with open(path) as fh:
            return Calibration(**{**json.load(fh), "cached": True})
    except (OSError, ValueError, TypeError):
        pass
    found = measure()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as fh:
        json.dump({**asdict(found), "cached": False}, fh, indent=1)
    try:
        os.link(tmp, path)  # fails where another run recorded first: then that one holds
    except FileExistsError:
        with open(path) as fh:
            found = Calibration(**{**json.load(fh), "cached": True})
    finally:
        os.unlink(tmp)
    return found
