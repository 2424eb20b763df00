"""The label stage's settings: the one place each is written (the program's flags and the
``labeled_shards`` launchpad config derive from it), and the presets that fill what is left
unset. Imports no ``dagster``, and no torch until a device is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from coyo_platform.common.settings import check_choices, setting

DEFAULT_MODEL = "tf_efficientnetv2_xl.in21k"
ACTIVATIONS = ("sigmoid", "softmax")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
#: How probabilities are written (``probabilities``): float16 values (the card's) or as computed.
PROBABILITIES = ("float16", "float32")
#: Batch sizes used when ``batch_size`` is not set. CUDA: 128, an estimate not yet measured on a
#: GPU: EfficientNetV2-XL at 512 in inference frees activations layer by layer, and its largest
#: layer output is 4.2M values per image (8 MB in bf16; counted with forward hooks on the CPU), so
#: with a few alive at once 128 images need a few GB, plus about 1 GB of weights: it fits 16 GB
#: cards and leaves an H100 room. ``benchmarks/label.py --gpu`` reports the measured peak.
#: CPU: 32; larger batches buy nothing there.
DEFAULT_BATCH = {"cuda": 128, "cpu": 32}
CHECKPOINT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "coyo_platform", "checkpoints")

#: Named settings bundles; a preset fills only the settings left unset (None).
#:
#: ``coyo`` reproduces the card's pipeline: EfficientNetV2-XL trained on ImageNet-21k, evaluated as
#: google/automl's EfficientNetV2 eval does it: the whole image resized to 512x512 (no crop) with
#: *bilinear* interpolation (automl's eval preprocessing uses tf.image.resize's bilinear default;
#: timm's pretrained_cfg says bicubic, which is timm's own choice), in float32 with half-pixel
#: centres and no antialias (``resize="automl"``: TF2's ``tf.image.resize``, which torch's
#: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` computes, on the
#: device), then automl's (x - 128) / 128. Activation ``sigmoid``: the card's example
#: probabilities sum to 1.0276, which softmax cannot give, and Google published these
#: ImageNet-21k checkpoints as sigmoid-loss checkpoints "for multi-class pseudo labeling".
#: Probabilities ``float16``: every probability of the card's example row is an exact float16
#: value (the card was labeled under TF's mixed_float16), so each is rounded to the nearest
#: float16 value and stored in the card's float32; with ``precision=auto`` the model runs float16
#: autocast on CUDA, as the card's did.
#:
#: ``timm`` uses the model's own timm eval config (test size, interpolation, mean/std), still with
#: the whole image squashed (no crop), and sigmoid unless ``activation`` says softmax (timm's own
#: inference.py always applies softmax; pick that for softmax-trained checkpoints).
PRESETS: dict[str, dict[str, Any]] = {
    "coyo": {
        "model": DEFAULT_MODEL,
        "image_size": 512,
        "interpolation": "bilinear",
        "resize": "automl",
        "mean": (128 / 255,) * 3,  # (x - 128) / 128 on 0-255 pixels, as automl's eval
        "std": (128 / 255,) * 3,
        "activation": "sigmoid",
        "probabilities": "float16",
    },
    "timm": {
        "model": DEFAULT_MODEL,
        "activation": "sigmoid",
        "resize": "timm",
        "probabilities": "float32",
    },
}
#: How images reach the model's input size (``resize``).
RESIZES = ("automl", "timm")

#: Model names that name a source rather than a timm architecture; they are checked when loaded.
MODEL_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")


@dataclass
class LabelSettings:
    """How to label. Settings left ``None`` come from the preset, then from the model's own timm
    eval config (``__post_init__`` fills them in and checks every value)."""

    preset: str = setting(
        "coyo",
        "coyo: the card's EfficientNetV2-XL pipeline; timm: the model's own eval config",
        tuple(PRESETS),
    )
    model: str | None = setting(None, f"timm model name (default: the preset's, {DEFAULT_MODEL})")
    checkpoint: str | None = setting(
        None,
        "weights: a path, or s3:// / hf:// / https:// (fetched once and cached where the label "
        "program runs); none: the model's pretrained weights from the Hugging Face hub",
    )
    checkpoint_cache: str | None = setting(
        None, f"where remote weights are cached (default: {CHECKPOINT_CACHE})"
    )
    activation: str | None = setting(
        None, "sigmoid or softmax (default: the preset's)", ACTIVATIONS
    )
    image_size: int | None = setting(None, "input size (default: the preset's, else the model's)")
    interpolation: str | None = setting(
        None, "resize interpolation (default: the preset's, else the model's)"
    )
    resize: str | None = setting(
        None,
        "automl: the card's eval, the whole image in float32 resized on the device (bilinear, "
        "half-pixel centres, no antialias), as tf.image.resize; timm: timm's eval transform in "
        "the loader (default: the preset's)",
        RESIZES,
    )
    mean: tuple[float, ...] | None = setting(None, "normalization mean, 3 values (default: preset)")
    std: tuple[float, ...] | None = setting(None, "normalization std, 3 values (default: preset)")
    precision: str = setting(
        "auto",
        "auto: measured at start, cached per machine and model (label/calibrate.py): on CUDA "
        "the card's fp16 unless bf16 is 1.1x as fast; on the CPU fp32 unless fp16 or bf16 is "
        "1.1x as fast; fp32: for exactness checks",
        PRECISIONS,
    )
    probabilities: str | None = setting(
        None,
        "float16: each probability rounded to the nearest float16 value, as the card's (stored "
        "as float32); float32: as computed (default: the preset's)",
        PROBABILITIES,
    )
    batch_size: int | None = setting(
        None,
        "images per batch (default: on CUDA measured at start, the largest power of two up to "
        "512 that fits; 32 on CPU)",
    )
    num_workers: int | None = setting(None, "loader processes (default: one per core but one)")
    device: str = setting("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ...")
    channels_last: bool = setting(True, "run the model in channels_last memory format")
    compile: bool = setting(False, "torch.compile the model: faster once warm, minutes to compile")
    decode_on_device: bool = setting(
        False, "decode JPEGs on the model's device with nvJPEG (torchvision)"
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_choices(self)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"{name} must be 3 values (R, G, B), got {value}")
        check_model_name(self.model)
        if self.checkpoint and "://" not in self.checkpoint and not os.path.isfile(self.checkpoint):
            raise ValueError(
                f"checkpoint {self.checkpoint}: no such file (a plain path must exist here and "
                "where the label program runs; for weights inside a container image write "
                "file:///path, for remote machines s3://, hf:// or https://)"
            )

    @property
    def workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return max(1, min(32, (os.cpu_count() or 2) - 1))

    @property
    def cache(self) -> str:
        return self.checkpoint_cache or CHECKPOINT_CACHE

    def resolved_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_batch_size(self, device) -> int:
        return self.batch_size or DEFAULT_BATCH.get(device.type, DEFAULT_BATCH["cpu"])

    def autocast_dtype(self, device):
        """fp16 or bf16 for autocast, or None for plain fp32, of an explicit precision;
        ``auto`` is chosen by measurement on the device (``calibrate.py``, in ``ModelStep``).
        Measured on an AMX Xeon (benchmarks/precision.py, RESULTS.md): bf16 1.8x as fast as
        fp32; fp16, though 9x closer to fp32 than bf16, no faster than fp32."""
        import torch

        chosen = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
        if self.precision not in chosen:
            raise ValueError(
                "precision=auto is chosen by measurement on the device (label/calibrate.py)"
            )
        return chosen[self.precision]


def check_model_name(name: str | None) -> str:
    """``name`` if timm knows it (the architecture, and the pretrained tag when one is given);
    else a ``ValueError`` naming it and the closest names timm has. Cheap: no model is built."""
    import difflib

    import timm

    if not name:
        raise ValueError("no model given: set a timm model name such as " + DEFAULT_MODEL)
    if name.startswith(MODEL_SOURCES):
        return name
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}: timm {timm.__version__} has no {arch!r}{hint}")
    if tag:
        tagged = timm.list_models(arch, pretrained=True)
        if name not in tagged:
            known = ", ".join(tagged) or "none"
            raise ValueError(
                f"unknown model {name!r}: no pretrained tag {tag!r}; {arch} has: {known}"
            )
    return name
