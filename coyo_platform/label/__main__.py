"""Label downloaded webdataset shards: top 50 of the card's 21,841 ImageNet-21k classes per image.

Usage::

    python -m coyo_platform.label --shards data/downloaded_shards/part-00000 \
        --output data/labeled_shards [--part part-00000] \
        [--preset coyo|timm] [--model NAME] [--checkpoint PATH|s3://...|hf://...] \
        [--activation sigmoid|softmax] [--image-size 512] [--precision auto|fp16|bf16|fp32] \
        [--batch-size N] [--num-workers N] [--device auto] [--compile] [--decode-on-device] ...

Every setting of ``label/settings.py`` is a flag (``--help`` lists them). Presets: ``coyo``
(default) is the card's pipeline, EfficientNetV2-XL ImageNet-21k at 512, automl's eval (the whole
image resized bilinearly in float32 without antialias, (x - 128) / 128), sigmoid, probabilities
on the float16 grid; ``timm`` is the model's own timm eval config with sigmoid.
Explicit flags override the preset.

Writes ``<output>/<labeler id>/<part>/NNNNN.parquet`` per shard (id, key, imagehash: the
downloader's pHash of the original image, labels, label_probs, width, height, error), one label set
per labeler (``label/labeler.py``: the weights' content digest, the resolved preprocessing,
activation, precision, torch and timm versions); shards already in this labeler's set are skipped.
Once every finished shard has labels, the set becomes the part's current one
(``<output>/_current/<part>.json``), which stats and the subset read. Bad input (settings, a
checkpoint that is not weights, labels made from other downloads) stops it with one ``error:`` line,
exit status 2. Without ``--checkpoint`` the model's pretrained weights come from the Hugging Face
hub; a remote checkpoint is fetched once into ``--checkpoint-cache``. A tar that cannot be read
writes nothing for that shard and makes the run fail (exit 1) after every other shard is written,
naming the shard.
Started by the ``labeled_shards`` asset through Dagster Pipes, or by hand.
Imports no ``dagster``: only ``dagster_pipes``, torch, timm, pyarrow and Pillow.
"""

from __future__ import annotations

import argparse

from coyo_platform.common import settings as declared
from coyo_platform.common.reporting import open_reporter
from coyo_platform.label.run import label_shards
from coyo_platform.label.settings import LabelSettings

INPUTS = {
    "--shards": "folder or s3:// prefix holding NNNNN.tar",
    "--output": "the label sets, a folder or s3:// prefix: <output>/<labeler id>/<part>/",
}


def parser() -> argparse.ArgumentParser:
    parser = declared.program_parser("python -m coyo_platform.label", LabelSettings, INPUTS)
    parser.add_argument("--part", default=None, help="the partition (default: --shards' name)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with open_reporter() as report:  # bad settings are reported through Pipes too
        settings = declared.from_arguments(LabelSettings, args)
        report.log.info(
            f"labeling {args.shards} with {settings.model} on {settings.resolved_device()}"
        )
        s = label_shards(args.shards, args.output, settings, log=report.log, part=args.part)
        if s.unreadable_shards:
            listed = "; ".join(f"{k}.tar: {v}" for k, v in sorted(s.unreadable_shards.items()))
            raise SystemExit(
                f"{len(s.unreadable_shards)} shard(s) could not be read and were not labeled "
                f"({s.shards_done} others were written; rerun after re-downloading): {listed}"
            )
        report.report(s.metadata(settings), data_version=s.data_version())


if __name__ == "__main__":
    main()
