"""Label downloaded webdataset shards: top 50 of the card's 21,841 ImageNet-21k classes per image.

Usage::

    python -m coyo_platform.worker --shards data/downloaded_shards/part-00000 \
        --output data/labeled_shards/part-00000 \
        [--preset coyo|timm] [--model NAME] [--checkpoint PATH|s3://...|hf://...] \
        [--activation sigmoid|softmax] [--image-size 512] [--precision auto|bf16|fp32] \
        [--batch-size N] [--num-workers N] [--device auto] [--compile] [--decode-on-device]

Presets (``labeler.PRESETS``): ``coyo`` (default) is the card's pipeline, EfficientNetV2-XL
ImageNet-21k at 512, whole image resized bilinearly, mean = std = 0.5, sigmoid; ``timm`` is the
model's own timm eval config with sigmoid. Explicit flags override the preset.

Writes ``<output>/NNNNN.parquet`` per shard (id, key, imagehash, labels, label_probs, width,
height, error); shards already written are skipped. Without ``--checkpoint`` the model's
pretrained weights come from the Hugging Face hub; a remote checkpoint is fetched once into
``--checkpoint-cache``. Device: CUDA when present, else CPU. Batch size: 128 on CUDA, 32 on CPU.
A tar that cannot be read writes nothing for that shard and makes the run fail (exit 1) after
every other shard is written, naming the shard.
Started by the ``labeled_shards`` asset through Dagster Pipes, or by hand.
Imports no ``dagster``: only ``dagster_pipes``, torch, timm, pyarrow, Pillow and imagehash.
"""

from __future__ import annotations

import argparse

from coyo_platform.core.reporting import md, open_reporter, path
from coyo_platform.worker.labeler import (
    ACTIVATIONS,
    PRECISIONS,
    PRESETS,
    LabelerSettings,
    label_shards,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = LabelerSettings()
    p = argparse.ArgumentParser(prog="python -m coyo_platform.worker")
    p.add_argument("--shards", required=True, help="folder or s3:// prefix holding NNNNN.tar")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for NNNNN.parquet")
    p.add_argument("--preset", choices=sorted(PRESETS), default="coyo", help="default coyo")
    p.add_argument("--model", default=None, help="timm model name (default: the preset's)")
    p.add_argument(
        "--checkpoint", default=None, help="weights: path, s3://, hf://... (default: hub)"
    )
    p.add_argument("--checkpoint-cache", default=d.checkpoint_cache, help="for remote weights")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None, help="default: preset's")
    p.add_argument("--image-size", type=int, default=None, help="default: preset's, else model's")
    p.add_argument("--interpolation", default=None, help="default: preset's, else model's")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="default auto")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile"
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=d.channels_last,
        help="channels_last memory format (default on)",
    )
    p.add_argument(
        "--decode-on-device",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode JPEGs on the model's device (nvJPEG on CUDA)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with open_reporter() as report:  # bad settings are reported through Pipes too
        settings = LabelerSettings(
            preset=args.preset,
            model=args.model,
            checkpoint=args.checkpoint,
            activation=args.activation,
            image_size=args.image_size,
            interpolation=args.interpolation,
            precision=args.precision,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            compile=args.compile,
            channels_last=args.channels_last,
            decode_on_device=args.decode_on_device,
            checkpoint_cache=args.checkpoint_cache,
        )
        device = settings.resolved_device()
        report.log.info(f"labeling {args.shards} with {settings.model} on {device}")
        s = label_shards(args.shards, args.output, settings, log=report.log)
        if s.unreadable_shards:
            listed = "; ".join(f"{k}.tar: {v}" for k, v in sorted(s.unreadable_shards.items()))
            raise SystemExit(
                f"{len(s.unreadable_shards)} shard(s) could not be read and were not labeled "
                f"({s.shards_done} others were written; rerun after re-downloading): {listed}"
            )
        reasons = "\n".join(f"| {r} | {n:,} |" for r, n in s.failed_by_reason.most_common())
        report.report(
            {
                "images_labeled": s.labeled,
                "images_failed": s.failed,
                "failed_by_reason": md("| reason | images |\n|---|---:|\n" + reasons),
                "shards_labeled": s.shards_done,
                "shards_skipped": s.shards_skipped,
                "images_per_second": round(s.images_per_second, 2),
                "seconds": round(s.seconds, 2),
                "warmup_seconds": round(s.warmup_seconds, 2),
                "peak_rss_mb": round(s.peak_rss_mb, 1),
                "peak_gpu_memory_mb": round(s.peak_device_memory_mb or 0, 1),
                "preset": settings.preset,
                "model": settings.model,
                "checkpoint": settings.checkpoint or "hub pretrained",
                "activation": settings.activation,
                "image_size": settings.image_size or "model's test size",
                "interpolation": settings.interpolation or "model's",
                "device": str(device),
                "precision": "bf16 autocast" if settings.autocast_dtype(device) else "fp32",
                "batch_size": settings.resolved_batch_size(device),
                "compiled": settings.compile,
                "decode_on_device": settings.decode_on_device,
                "path": path(args.output),
            }
        )


if __name__ == "__main__":
    main()
