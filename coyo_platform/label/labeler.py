"""A labeler's fingerprint and id: what decides a label set's bytes. Two runs with the same
fingerprint write the same labels (on the same kind of machine), so they share one label set,
``labeled_shards/<labeler id>/``; anything else is another labeler, with a set of its own.

The fingerprint: the model name, the weights' content digest (``weights.load_model``: the
checkpoint file's sha256, so a copy under another path or URL is the same labeler), the
preprocessing as resolved (input size, interpolation, mean, std, crop), the activation, the
precision as resolved on this device (``auto`` is fp16, bf16 or fp32), the probabilities'
grid (float16 or as computed), the device type and where JPEGs
are decoded (both change the numbers), and the torch and timm versions. Not in it: the batch
size, the loader processes and the GPU model; a resume with the same settings batches alike.
The id is ``<model>-<12 hex digits of the fingerprint's digest>``. Imports no ``dagster``.
"""

from __future__ import annotations

from typing import Any

from coyo_platform.common import provenance


def fingerprint(
    model: str,
    weights_sha256: str,
    config: dict[str, Any],
    activation: str,
    precision: str,
    device: str,
    decode: str,
    probabilities: str = "float32",
) -> dict[str, Any]:
    import timm
    import torch

    automl = {"resize": "automl"} if config.get("resize") == "automl" else {}  # else: timm's
    grid = {"probabilities": probabilities} if probabilities != "float32" else {}
    return {
        **automl,
        **grid,
        "model": model,
        "weights_sha256": weights_sha256,
        "input_size": list(config["input_size"]),
        "interpolation": config["interpolation"],
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": config["crop_mode"],
        "activation": activation,
        "precision": precision,
        "device": device,  # cpu or cuda: other kernels, other bits
        "decode": decode,  # where JPEGs are decoded and resized: cpu (PIL, timm) or device
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def labeler_id(value: dict[str, Any]) -> str:
    return f"{provenance.slug(value['model'])}-{provenance.digest(value, 12)}"
