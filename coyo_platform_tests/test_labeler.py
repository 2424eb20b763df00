"""The labeler against timm's own inference recipe, on real photos in a webdataset tar."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image

from coyo_platform import demo
from coyo_platform.core.labelspace import goog_to_fall11
from coyo_platform.worker.labeler import LabelerSettings, label_shards, load_model

PROB_TOLERANCE = 1e-5  # fp32 on the CPU; batching may change the last bits


def _write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, meta in samples:
            for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(site, tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("shards")
    photos = sorted(
        p for p in site.images.glob("*.jpg") if p.stem.startswith(("astro", "coffee", "chel"))
    )
    samples = [
        (f"{i:09d}", p.read_bytes(), {"id": 1000 + i, "original_width": 1, "original_height": 2})
        for i, p in enumerate(photos)
    ]
    broken = (site.images / "truncated.jpg").read_bytes()
    samples.insert(2, ("000000099", broken, {"id": 9999}))
    _write_tar(folder / "00000.tar", samples[:4])
    _write_tar(folder / "00001.tar", samples[4:])
    return folder, photos


def _timm_reference(checkpoint: Path, photos: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's recipe: create_model -> resolve_data_config -> create_transform (whole image, no
    crop) -> eval -> inference_mode; then sigmoid, the card's 21,841 classes, top 50."""
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(
        demo.DEMO_MODEL, pretrained=False, num_classes=21_843, checkpoint_path=str(checkpoint)
    ).eval()
    config = resolve_data_config(model=model, use_test_size=True)
    transform = create_transform(**{**config, "crop_pct": 1.0, "crop_mode": "squash"})
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.inference_mode():
        probs = torch.sigmoid(model(batch))[:, torch.as_tensor(goog_to_fall11())]
    return probs.topk(50, dim=1)


def test_worker_matches_timm_recipe_and_records_broken_images(site, shards, tmp_path: Path):
    folder, photos = shards
    settings = LabelerSettings(
        preset="timm",
        model=demo.DEMO_MODEL,
        checkpoint=str(site.checkpoint),
        batch_size=3,
        num_workers=1,
    )
    summary = label_shards(str(folder), str(tmp_path / "out"), settings)
    assert summary.labeled == len(photos)
    assert summary.failed == 1
    assert summary.failed_by_reason == {"decode: OSError": 1}

    out = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    broken = out.filter(pl.col("id") == 9999)
    assert broken["error"][0].startswith("decode: OSError")
    assert broken["labels"][0] is None

    labeled = out.filter(pl.col("error").is_null())
    values, indices = _timm_reference(site.checkpoint, photos)
    assert labeled["id"].to_list() == [1000 + i for i in range(len(photos))]
    assert labeled["labels"].to_list() == indices.tolist()
    got = torch.tensor(labeled["label_probs"].to_list())
    assert torch.allclose(got, values, atol=PROB_TOLERANCE, rtol=0)


def test_rerun_labels_only_missing_shards(site, shards, tmp_path: Path):
    folder, _ = shards
    settings = LabelerSettings(
        preset="timm", model=demo.DEMO_MODEL, checkpoint=str(site.checkpoint), num_workers=0
    )
    out = tmp_path / "out"
    label_shards(str(folder), str(out), settings)
    first = (out / "00000.parquet").read_bytes()
    (out / "00001.parquet").unlink()  # as if the worker died before the second shard
    summary = label_shards(str(folder), str(out), settings)
    assert (summary.shards_done, summary.shards_skipped) == (1, 1)
    assert (out / "00000.parquet").read_bytes() == first
    assert not list(out.glob("*.tmp-*")), "no temporary file may be left visible"


def test_coyo_preset_is_the_cards_eval(site):
    settings = LabelerSettings()
    assert settings.model == "tf_efficientnetv2_xl.in21k"
    assert settings.activation == "sigmoid"
    # the preset's preprocessing, applied to a small model loaded offline
    settings = LabelerSettings(model=demo.DEMO_MODEL, checkpoint=str(site.checkpoint))
    _, config = load_model(settings)
    assert config["input_size"] == (3, 512, 512)
    assert config["interpolation"] == "bilinear"
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    assert (config["crop_pct"], config["crop_mode"]) == (1.0, "squash")


def test_explicit_settings_beat_the_preset():
    settings = LabelerSettings(preset="coyo", activation="softmax", image_size=384)
    assert (settings.activation, settings.image_size) == ("softmax", 384)
    with pytest.raises(ValueError, match="unknown preset 'jft'"):
        LabelerSettings(preset="jft")
    with pytest.raises(ValueError, match="activation must be one of"):
        LabelerSettings(activation="relu")


def test_checkpoint_with_wrong_class_count_is_refused(tmp_path: Path):
    import timm

    path = tmp_path / "in1k.pth"
    torch.save(timm.create_model(demo.DEMO_MODEL, num_classes=1000).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit test_efficientnet with 21843 outputs"):
        load_model(LabelerSettings(model=demo.DEMO_MODEL, checkpoint=str(path)))
