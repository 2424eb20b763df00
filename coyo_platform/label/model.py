"""The model on its device: uint8 batches in, the card's top 50 out.

:class:`DeviceInputs` puts a batch on the device (a copy on a side CUDA stream, or JPEG bytes
decoded and resized there); :class:`ModelStep` normalizes it, runs the model (fp16 or bf16
autocast, channels_last) and selects the top 50 of the 21,841 card classes (on the float16 grid
for the coyo preset). Every batch is padded to the batch size, so every image goes through the
same kernels. ``launch`` queues a batch and returns at once on CUDA; ``collect`` waits for that
batch's labels. Imports no ``dagster``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from coyo_platform.common.formats import TOP_K
from coyo_platform.common.labelspace import goog_to_fall11
from coyo_platform.label import calibrate, labeler
from coyo_platform.label.samples import build_transform
from coyo_platform.label.settings import LabelSettings
from coyo_platform.label.weights import load_model

Launched = tuple[torch.Tensor, torch.Tensor, Any]


class DeviceInputs:
    """Batches onto the device: uint8 NCHW tensors copied without blocking, JPEG bytes decoded
    (nvJPEG on CUDA) and resized there."""

    def __init__(self, device: torch.device, config: dict[str, Any]) -> None:
        self.device, self.config = device, config
        self.size = config["input_size"][1:]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._transform = None

    def __call__(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """NCHW on the device: uint8 (timm's transform), or float32 resized here
        (``resize="automl"``)."""
        if self.config.get("resize") == "automl":
            return self._automl(inputs)
        if isinstance(inputs, torch.Tensor):
            return self._copy(inputs)
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2.functional import resize

        jpegs = [i for i, t in enumerate(inputs) if t.dim() == 1]
        decoded = self._decode_jpegs([inputs[i] for i in jpegs]) if jpegs else []
        mode = InterpolationMode(self.config["interpolation"])
        out = [self._copy(t) if t.dim() == 3 else t for t in inputs]
        for i, img in zip(jpegs, decoded, strict=True):
            if tuple(img.shape[1:]) != tuple(self.size):
                img = resize(img, list(self.size), interpolation=mode, antialias=True)
            out[i] = img
        return torch.stack(out)

    def _automl(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """automl's eval resize, image by image on the device: float32, bilinear with
        half-pixel centres and no antialias (TF2's ``tf.image.resize``) to the input size."""
        import torch.nn.functional as F  # noqa: N812

        if isinstance(inputs, torch.Tensor):
            images = list(self._copy(inputs).unbind(0))
        else:
            jpegs = [i for i, t in enumerate(inputs) if t.dim() == 1]
            decoded = self._decode_jpegs([inputs[i] for i in jpegs]) if jpegs else []
            images = [self._copy(t) if t.dim() == 3 else t for t in inputs]
            for i, img in zip(jpegs, decoded, strict=True):
                images[i] = img
        size = tuple(self.size)
        out = [
            F.interpolate(
                img[None].float(), size=size, mode="bilinear", align_corners=False, antialias=False
            )[0]
            if tuple(img.shape[1:]) != size
            else img.float()
            for img in images
        ]
        return torch.stack(out)

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        """Host to device on a side stream (CUDA), so the copy overlaps the previous batch."""
        if self.copy_stream is None:
            return x.to(self.device, non_blocking=True)
        with torch.cuda.stream(self.copy_stream):
            y = x.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        y.record_stream(compute)
        return y

    def _decode_jpegs(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        """RGB uint8 CHW tensors on the device. nvJPEG decodes on its own stream, which does not
        wait for ours, into memory our queued kernels may still use: so the compute stream is
        drained first. A batch nvJPEG rejects is decoded image by image, and an image it rejects
        goes through the CPU path (PIL and timm's transform), which accepted it already."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
            try:
                return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                pass
            return [self._decode_one(data) for data in jpegs]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            [img] = decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)
            return img
        except RuntimeError:
            if self._transform is None:
                self._transform = build_transform(self.config)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return self._transform(img.convert("RGB")).to(self.device)


class ModelStep:
    """The model on its device, fed uint8 batches; ``launch`` queues a batch and returns at once
    (on CUDA), ``collect`` waits for that batch's top 50."""

    def __init__(
        self,
        settings: LabelSettings,
        device: torch.device,
        label_set_exists: Callable[[str], bool] | None = None,
    ) -> None:
        model, self.config, self.weights_sha256 = load_model(settings)
        self.device = device
        self.dtype = None if settings.precision == "auto" else settings.autocast_dtype(device)
        self.batch_size = settings.resolved_batch_size(device)
        self.memory_format = torch.channels_last if settings.channels_last else None
        if device.type == "cuda":
            torch.cuda.set_device(device)  # current streams and events below are this device's
            torch.backends.cudnn.benchmark = True  # one input size for the whole run
        model = model.to(device)
        if self.memory_format:
            model = model.to(memory_format=self.memory_format)
        self.compiled = settings.compile
        self.model = torch.compile(model, dynamic=False) if settings.compile else model
        self.index = torch.as_tensor(goog_to_fall11(), device=device)
        self.activation = settings.activation
        self.float16_grid = settings.probabilities == "float16"
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([255 * m for m in self.config["mean"]], device=device).view(shape)
        self.std = torch.tensor([255 * s for s in self.config["std"]], device=device).view(shape)
        self.inputs = DeviceInputs(device, self.config)
        self.calibration: calibrate.Calibration | None = None
        if settings.precision == "auto" or (settings.batch_size is None and device.type == "cuda"):
            self.calibration = self._calibrated(settings, model, label_set_exists)
            self.dtype = self.calibration.dtype
            self.batch_size = self.calibration.batch_size

    def _existing_precision(
        self, settings: LabelSettings, label_set_exists: Callable[[str], bool]
    ) -> tuple[str, str] | None:
        """The candidate precision of a label set of this labeler already under the labels root,
        and its id: ``auto`` keeps to it, so partitions labeled on other machines, or in a fresh
        container after a kill, join the same set."""
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        for precision in calibrate.CANDIDATES[kind]:
            self.dtype = calibrate.DTYPES[precision]
            labeled = labeler.labeler_id(self.fingerprint(settings))
            if label_set_exists(labeled):
                return precision, labeled
        self.dtype = None
        return None

    def _calibrated(
        self,
        settings: LabelSettings,
        eager: torch.nn.Module,
        label_set_exists: Callable[[str], bool] | None,
    ) -> calibrate.Calibration:
        """``precision=auto`` and the batch size by measurement (``calibrate.py``), on the eager
        model (a compiled one would compile once per candidate), cached per machine and model;
        ``auto`` first keeps to the precision of a label set of this labeler already there."""
        precision, kept = settings.precision, None
        if precision == "auto" and label_set_exists is not None:
            kept = self._existing_precision(settings, label_set_exists)
        if kept is not None:
            precision = kept[0]
            why = (
                f"{precision}: the precision of label set {kept[1]}, already under the labels root"
            )
            if settings.batch_size is not None or self.device.type != "cuda":
                batch = settings.resolved_batch_size(self.device)
                return calibrate.Calibration(
                    precision, batch, why, machine=calibrate.machine(self.device)
                )
        size = tuple(self.config["input_size"])

        def run(batch: int, dtype: torch.dtype | None) -> None:
            x = torch.randint(0, 256, (batch, *size), device=self.device, dtype=torch.uint8)
            x = x.float().sub_(self.mean).div_(self.std)
            if self.memory_format:
                x = x.contiguous(memory_format=self.memory_format)
            with torch.inference_mode():
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                    eager(x)

        def measure() -> calibrate.Calibration:
            chosen, batch, rates, why = calibrate.calibrate(
                run, self.device, precision, settings.batch_size
            )
            return calibrate.Calibration(chosen, batch, why, rates, calibrate.machine(self.device))

        step = {
            "precision": precision,
            "batch_size": settings.batch_size,
            "channels_last": settings.channels_last,
            "compile": settings.compile,
            "decode_on_device": settings.decode_on_device,
        }
        found = calibrate.cached(
            settings.cache, self.device, settings.model, self.weights_sha256, size, step, measure
        )
        if kept is not None:  # the batch measured; the precision the label set's
            found.why = f"{why}; {found.why}"
        return found

    @property
    def precision(self) -> str:
        """``fp16``, ``bf16`` (autocast) or ``fp32``, as resolved on this device."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")

    def fingerprint(self, settings: LabelSettings) -> dict[str, Any]:
        """This labeler's fingerprint (``labeler.py``), as resolved on this device."""
        decode = "device" if settings.decode_on_device else "cpu"  # nvJPEG's pixels differ
        return labeler.fingerprint(
            settings.model,
            self.weights_sha256,
            self.config,
            self.activation,
            self.precision,
            device=self.device.type,
            decode=decode,
            probabilities=settings.probabilities,
        )

    def _normalized(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        n = len(inputs)
        x = self.inputs(inputs)
        if n < self.batch_size:  # one shape (compiled or not, the same kernels): pad the batch
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        x = x.float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format) if self.memory_format else x

    def launch(self, inputs: torch.Tensor | list[torch.Tensor]) -> Launched:
        n = len(inputs)
        x = self._normalized(inputs)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x)[:n]
        logits = logits.float()
        probs = logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(-1)
        values, labels = probs.index_select(1, self.index).topk(TOP_K, dim=1)
        if self.float16_grid:  # the card's values: each the nearest float16 (order kept)
            values = values.half().float()
        labels = labels.int()
        if self.device.type != "cuda":
            return values, labels, None
        host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host_labels = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
        host_values.copy_(values, non_blocking=True)
        host_labels.copy_(labels, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return host_values, host_labels, done

    @staticmethod
    def collect(launched: Launched) -> tuple[list, list]:
        values, labels, done = launched
        if done is not None:
            done.synchronize()
        return values.tolist(), labels.tolist()
