"""Which precision ``precision=auto`` should pick on this CPU: how fast, and how close to fp32.

    python benchmarks/precision.py

Speed: the label program's model step alone (``ModelStep``: normalize, model in channels_last,
sigmoid, 21,841-class top 50) on ``tf_efficientnetv2_b0`` at 224, batch 32, random weights, for
``--seconds`` each in fp32, bf16 and fp16 autocast. Closeness: a trained ImageNet-1k
EfficientNet-Lite0 (``benchmarks/originals.py``'s) on scikit-image's shipped photos, the card's
resize, at 224 and 512: top-1 agreement with fp32 and the largest |difference| of any top-5
probability, in bf16 and fp16 autocast. Prints whether the CPU has native fp16 and bf16 (what
``auto`` reads), a table, and a JSON line.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.originals import PHOTOS, lite0  # noqa: E402
from coyo_platform.label.samples import original_pixels  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def speed(seconds: float) -> dict[str, float]:
    import tempfile

    import timm

    from coyo_platform.common.labelspace import NUM_MODEL_OUTPUTS
    from coyo_platform.label.model import ModelStep
    from coyo_platform.label.settings import LabelSettings

    net = timm.create_model("tf_efficientnetv2_b0", pretrained=False, num_classes=NUM_MODEL_OUTPUTS)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = f"{tmp}/b0.pth"
        torch.save(net.state_dict(), checkpoint)
        batch = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)
        for name in DTYPES:
            settings = LabelSettings(
                preset="timm", model="tf_efficientnetv2_b0", checkpoint=checkpoint,
                precision=name, batch_size=32, image_size=224,
            )  # fmt: skip
            step = ModelStep(settings, torch.device("cpu"))
            with torch.inference_mode():
                step.collect(step.launch(batch))  # warm
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < seconds:
                    step.collect(step.launch(batch))
                    n += len(batch)
            out[name] = n / (time.perf_counter() - start)
    return out


@torch.no_grad()
def closeness(size: int) -> dict[str, dict[str, float]]:
    from PIL import Image

    model, mean, std = lite0()
    shipped = importlib.resources.files("skimage.data")
    x = []
    for photo in PHOTOS:
        with Image.open(shipped.joinpath(photo)) as img:
            pixels = original_pixels(img.convert("RGB")).float()[None]
        x.append(torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear"))
    x = (torch.cat(x) / 255 - mean) / std
    probs = {}
    for name, dtype in DTYPES.items():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            probs[name] = model(x).float().softmax(-1)
    ref = probs["fp32"]
    top5 = ref.topk(5, dim=1).indices
    return {
        name: {
            "top1_agree": int((p.argmax(1) == ref.argmax(1)).sum()),
            "top5_max_abs_diff": float((p.gather(1, top5) - ref.gather(1, top5)).abs().max()),
        }
        for name, p in probs.items()
        if name != "fp32"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per precision (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    native = {
        "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported(),
        "bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    }
    print(
        f"{platform.processor() or platform.machine()}; native {native}; torch {torch.__version__}"
    )
    rates = speed(args.seconds)
    close = {size: closeness(size) for size in (224, 512)}
    print(f"{'precision':<10} {'b0 model step':>14}  lite0 vs fp32 on {len(PHOTOS)} photos")
    for name, rate in rates.items():
        cells = "  ".join(
            f"@{s}: top-1 {c[name]['top1_agree']}/{len(PHOTOS)}, top-5 max|dp| "
            f"{c[name]['top5_max_abs_diff']:.5f}"
            for s, c in close.items()
            if name in c
        )
        print(f"{name:<10} {rate:>10.1f} img/s  {cells or '(reference)'}")
    print(json.dumps({"native": native, "img_per_s": rates, "closeness": close}))


if __name__ == "__main__":
    main()
