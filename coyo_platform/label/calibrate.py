"""``precision=auto`` and the batch size chosen by measurement, on this machine for this model.

At start the label program runs a few batches of the model, in each candidate precision, on
random inputs of the model's input size, and keeps the fastest: fp16 (the card's arithmetic) or
bf16 on CUDA; fp32, fp16 or bf16 on the CPU, whatever the CPU's flags say. A candidate closer to
the card's arithmetic (CUDA: fp16, then bf16; CPU: fp32, then fp16, then bf16) is kept unless
another is at least ``MARGIN`` times as fast (a margin against noise; a close call can still go
either way). On CUDA without a ``batch_size``, the batch is the largest power of two up to
``MAX_BATCH`` whose peak memory, estimated from batches of 8 and 16 and then measured at the
batch itself, fits ``MEMORY_SHARE`` of what the device has free; on the CPU it is
``DEFAULT_BATCH["cpu"]``.

Precision is part of the labeler's fingerprint, so two choices would make two label sets. Hence
``ModelStep`` measures only when no label set of this labeler in another candidate precision
exists under the labels root yet: once one does, ``auto`` takes its precision, on every machine
and container (``model.py``). The measurement itself is cached per machine and model
(``<checkpoint cache>/calibration/<digest>.json``; the first record written stays). The label
run's metadata says what was chosen, the figures, and why. Imports no ``dagster``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from coyo_platform.common.machine import cpu_model
from coyo_platform.label.settings import DEFAULT_BATCH

VERSION = 2  # 2: interleaved best-of rounds after warming every candidate
#: A faster candidate replaces a more faithful one only at this speed ratio or more.
MARGIN = 1.10
#: Timed rounds per candidate (interleaved, the best kept), each of at least MIN_SECONDS (and at
#: least one batch), after one warm-up batch of each; the batch they run on the CPU.
ROUNDS = 3
MIN_SECONDS = 0.25
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
        name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return f"{device.type}: {name}; torch {torch.__version__}"


def _key(device: torch.device, model: str, weights: str, size: tuple, step: dict) -> str:
    value = json.dumps([VERSION, machine(device), model, weights, list(size), step], default=str)
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _rates(run, batch: int, order: tuple[str, ...], device: torch.device) -> dict[str, float]:
    """Images per second of each precision in ``order``: every one warmed up first (the first
    batch of each pays for kernel selection and allocations), then timed in ``ROUNDS``
    interleaved rounds of at least ``MIN_SECONDS`` each, keeping each one's best round (what
    another process on the machine took from a round is not held against it)."""
    for precision in order:
        run(batch, DTYPES[precision])
    _sync(device)
    best = dict.fromkeys(order, 0.0)
    for _ in range(ROUNDS):
        for precision in order:
            images, start = 0, time.perf_counter()
            while True:
                run(batch, DTYPES[precision])
                _sync(device)
                images += batch
                elapsed = time.perf_counter() - start
                if elapsed >= MIN_SECONDS:
                    break
            best[precision] = max(best[precision], images / elapsed)
    return best


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


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA's allocator and cuDNN/cuBLAS say "out of memory" in more than one exception type."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)
    )


def _largest_batch(run, device: torch.device, dtype: torch.dtype | None) -> tuple[int, str]:
    """CUDA: the largest power-of-two batch whose measured peak memory stays within
    ``MEMORY_SHARE`` of what the device has free, estimated from batches of 8 and 16, then run
    and halved until its peak fits."""

    def peak(batch: int) -> int:
        torch.cuda.reset_peak_memory_stats(device)
        run(batch, dtype)
        _sync(device)
        return torch.cuda.max_memory_allocated(device)

    free, total = torch.cuda.mem_get_info(device)
    budget = MEMORY_SHARE * (free + torch.cuda.memory_reserved(device))  # ours is reusable
    small, large = peak(8), peak(16)
    per_image = max((large - small) // 8, large // 16, 1)  # a workspace can hide the slope
    base = max(0, large - 16 * per_image)
    batch = 16
    while batch * 2 <= MAX_BATCH and base + per_image * batch * 2 <= budget:
        batch *= 2
    while batch > 1:
        try:
            used = peak(batch)
            if used <= budget:
                break
        except Exception as exc:  # noqa: BLE001 - only running out of memory halves the batch
            if not _out_of_memory(exc):
                raise
        torch.cuda.empty_cache()
        batch //= 2
    why = (
        f"batch {batch}: the largest power of two up to {MAX_BATCH} whose peak fits "
        f"{MEMORY_SHARE:.0%} of the {budget / MEMORY_SHARE / 2**30:.1f} GiB free of "
        f"{total / 2**30:.0f} GiB (about {per_image / 2**20:.0f} MiB an image measured)"
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
        reasons.append(f"batch {batch}: the CPU default")
    rates: dict[str, float] = {}
    if precision == "auto":
        order = CANDIDATES["cuda" if device.type == "cuda" else "cpu"]
        timed = batch if device.type == "cuda" else min(batch, CPU_CALIBRATION_BATCH)
        with torch.inference_mode():
            rates = _rates(run, timed, order, device)
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
    first record written stays: a concurrent run's is not overwritten). A record that cannot be
    read or written costs only the cache: the run goes on with its own measurement."""
    path = os.path.join(folder, "calibration", f"{_key(device, model, weights, size, step)}.json")
    recorded = _read(path)
    if recorded is not None:
        return recorded
    found = measure()
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump({**asdict(found), "cached": False}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails where another run recorded first: then that one holds
    except FileExistsError:
        return _read(path) or found
    except OSError:  # a read-only cache, a filesystem without hard links: not recorded
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return found


def _read(path: str) -> Calibration | None:
    try:
        with open(path) as fh:
            value = json.load(fh)
        found = Calibration(**{**value, "cached": True})
        DTYPES[found.precision]  # noqa: B018 - a precision this version knows
        return found if found.version == VERSION and found.batch_size >= 1 else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
