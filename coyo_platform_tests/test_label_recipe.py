"""Labeling against timm's own inference recipe, on real photos in a webdataset tar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from coyo_platform import demo
from coyo_platform.common.labelspace import goog_to_fall11
from coyo_platform.label.run import label_shards
from coyo_platform.label.settings import LabelSettings
from coyo_platform.label.weights import load_model, local_checkpoint
from coyo_platform_tests.conftest import write_tar

PROB_TOLERANCE = 1e-5  # fp32 on the CPU; batching and channels_last may change the last bits


@pytest.fixture(scope="module")
def shards(site, tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("shards")
    photos = sorted(
        p for p in site.images.glob("*.jpg") if p.stem.startswith(("astro", "coffee", "chel"))
    )
    samples = [
        (
            f"{i:09d}",
            p.read_bytes(),
            # the downloader's pHash of the original rides in the json (img2dataset's meta)
            {"id": 1000 + i, "original_width": 1, "original_height": 2, "phash": f"{i:016x}"},
        )
        for i, p in enumerate(photos)
    ]
    broken = (site.images / "truncated.jpg").read_bytes()
    samples.insert(2, ("000000099", broken, {"id": 9999}))
    write_tar(folder / "00000.tar", samples[:4])
    write_tar(folder / "00001.tar", samples[4:])
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


def test_labels_match_timm_recipe_and_record_broken_images(site, shards, tmp_path: Path):
    folder, photos = shards
    settings = LabelSettings(
        preset="timm",
        model=demo.DEMO_MODEL,
        checkpoint=str(site.checkpoint),
        precision="fp32",  # the fast path otherwise: uint8 transfer, channels_last, lagged collect
        batch_size=3,
        num_workers=1,
    )
    summary = label_shards(str(folder), str(tmp_path / "out"), settings)
    assert summary.labeled == len(photos)
    assert summary.failed == 1
    assert summary.failed_by_reason == {"decode: OSError": 1}

    out = pl.read_parquet(Path(summary.folder) / "*.parquet").sort("id")
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
    settings = LabelSettings(
        preset="timm", model=demo.DEMO_MODEL, checkpoint=str(site.checkpoint), num_workers=0
    )
    out = Path(label_shards(str(folder), str(tmp_path / "out"), settings).folder)
    first = (out / "00000.parquet").read_bytes()
    (out / "00001.parquet").unlink()  # as if the run died before the second shard
    summary = label_shards(str(folder), str(tmp_path / "out"), settings)
    assert summary.folder == str(out)
    assert (summary.shards_done, summary.shards_skipped) == (1, 1)
    assert (out / "00000.parquet").read_bytes() == first
    assert not list(out.glob("*.tmp-*")), "no temporary file may be left visible"


def test_coyo_preset_is_the_cards_eval(site):
    settings = LabelSettings()
    assert settings.model == "tf_efficientnetv2_xl.in21k"
    assert settings.activation == "sigmoid"
    # the preset's preprocessing, applied to a small model loaded offline
    settings = LabelSettings(model=demo.DEMO_MODEL, checkpoint=str(site.checkpoint))
    _, config, _ = load_model(settings)
    assert config["input_size"] == (3, 512, 512)
    assert config["interpolation"] == "bilinear"
    assert config["resize"] == "automl"  # float32, half-pixel centres, no antialias, on device
    assert config["mean"] == config["std"] == (128 / 255,) * 3  # (x - 128) / 128
    assert (config["crop_pct"], config["crop_mode"]) == (1.0, "squash")


def _tf_resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """TF2's ``tf.image.resize(image, [size, size])`` (bilinear, ``antialias=False``), as its
    kernel computes it: half-pixel centres, ``in = (out + 0.5) * scale - 0.5``, the lower
    neighbour ``max(floor(in), 0)``, the upper ``min(ceil(in), n - 1)``, weight
    ``in - floor(in)``; float32 throughout."""

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = n_in / size
        src = (np.arange(size) + 0.5) * scale - 0.5
        floor = np.floor(src)
        lower = np.maximum(floor, 0).astype(int)
        upper = np.minimum(np.ceil(src), n_in - 1).astype(int)
        return lower, upper, (src - floor).astype(np.float32)

    x = image.astype(np.float32)
    top, bottom, dy = axis(x.shape[0])
    left, right, dx = axis(x.shape[1])
    dx, dy = dx[None, :, None], dy[:, None, None]
    upper_row = x[top][:, left] + (x[top][:, right] - x[top][:, left]) * dx
    lower_row = x[bottom][:, left] + (x[bottom][:, right] - x[bottom][:, left]) * dx
    return upper_row + (lower_row - upper_row) * dy


def _automl_reference(checkpoint: Path, images: list[bytes], size: int):
    """automl's EfficientNetV2 eval, written out: decode, the whole image resized as TF2 does
    (float32, no antialias), (x - 128) / 128, the model, sigmoid, the 21,841 fall11 classes,
    top 50."""
    import io

    import timm

    model = timm.create_model(
        demo.DEMO_MODEL, pretrained=False, num_classes=21_843, checkpoint_path=str(checkpoint)
    ).eval()
    inputs = []
    for data in images:
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        inputs.append((_tf_resize_bilinear(rgb, size) - 128.0) / 128.0)
    batch = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        probs = torch.sigmoid(model(batch))[:, torch.as_tensor(goog_to_fall11())]
    return probs.topk(50, dim=1)


def test_the_coyo_preset_computes_automls_eval(site, tmp_path: Path):
    """Real photos of several sizes (downscaled, upscaled, one already at the input size, one
    wide): the label program's coyo preset in fp32 gives automl's eval recipe's labels, and its
    probabilities within 1e-5."""
    import io

    size = 512
    photos = sorted(p for p in site.images.glob("*.jpg") if p.stem.startswith(("astro", "coffee")))
    shapes = [(700, 500), (300, 200), (512, 512), (1024, 300), (333, 517)]
    images = []
    for i, (w, h) in enumerate(shapes):
        buf = io.BytesIO()
        Image.open(photos[i % len(photos)]).convert("RGB").resize((w, h)).save(
            buf, format="JPEG", quality=92
        )
        images.append(buf.getvalue())
    (tmp_path / "shards").mkdir()
    samples = [(f"{i:09d}", data, {"id": 10 + i}) for i, data in enumerate(images)]
    write_tar(tmp_path / "shards" / "00000.tar", samples)
    settings = LabelSettings(
        preset="coyo",
        model=demo.DEMO_MODEL,
        checkpoint=str(site.checkpoint),
        precision="fp32",  # for exactness checks: fp32, and probabilities as computed
        probabilities="float32",
        batch_size=2,
        num_workers=1,
    )
    summary = label_shards(str(tmp_path / "shards"), str(tmp_path / "out"), settings)
    assert summary.labeled == len(images)
    out = pl.read_parquet(Path(summary.folder) / "*.parquet").sort("id")
    values, indices = _automl_reference(site.checkpoint, images, size)
    got = torch.tensor(out["label_probs"].to_list())
    assert out["labels"].to_list() == indices.tolist()
    assert torch.allclose(got, values, atol=PROB_TOLERANCE, rtol=0)
    # and it is not timm's antialiased transform: the downscaled photos differ from it
    timm_values, _ = _timm_at(site.checkpoint, images, size)
    assert (timm_values - values).abs().max() > 10 * PROB_TOLERANCE


#: The card's example row (id 315): its first ten label_probs, as the card prints them.
CARD_EXAMPLE_PROBS = (
    0.4453125, 0.30419921875, 0.09417724609375, 0.033905029296875, 0.03240966796875,
    0.0157928466796875, 0.01406097412109375, 0.01129150390625, 0.00978851318359375,
    0.00841522216796875,
)  # fmt: skip


def _on_float16_grid(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return values.astype(np.float16).astype(np.float32) == values


def test_the_coyo_preset_writes_probabilities_on_the_float16_grid(site, shards, tmp_path: Path):
    """As the card's: each probability an exact float16 value (the card's example row is), stored
    as float32 in the card's schema; ``probabilities=float32`` writes them as computed."""
    assert _on_float16_grid(np.array(CARD_EXAMPLE_PROBS)).all()
    folder, photos = shards
    base = {"preset": "coyo", "model": demo.DEMO_MODEL, "checkpoint": str(site.checkpoint)}
    grid = label_shards(str(folder), str(tmp_path / "a"), LabelSettings(**base, num_workers=1))
    labels = pl.read_parquet(Path(grid.folder) / "*.parquet").filter(pl.col("error").is_null())
    assert labels.height == len(photos)
    assert labels.schema["label_probs"] == pl.List(pl.Float32)
    probs = np.array(labels["label_probs"].to_list(), dtype=np.float32)
    assert _on_float16_grid(probs).all()
    assert (np.diff(probs, axis=1) <= 0).all()  # still in descending order
    raw = LabelSettings(**base, num_workers=1, precision="fp32", probabilities="float32")
    computed = label_shards(str(folder), str(tmp_path / "b"), raw)
    assert computed.folder != grid.folder  # another labeler: its own label set
    values = np.array(pl.read_parquet(Path(computed.folder) / "*.parquet")
                      .filter(pl.col("error").is_null())["label_probs"].to_list())  # fmt: skip
    assert not _on_float16_grid(values).all()


def _timm_at(checkpoint: Path, images: list[bytes], size: int):
    """timm's eval transform (PIL bilinear, antialiased) at ``size``, for contrast."""
    import io

    import timm
    from timm.data import create_transform

    model = timm.create_model(
        demo.DEMO_MODEL, pretrained=False, num_classes=21_843, checkpoint_path=str(checkpoint)
    ).eval()
    transform = create_transform(
        input_size=(3, size, size), interpolation="bilinear", mean=(128 / 255,) * 3,
        std=(128 / 255,) * 3, crop_pct=1.0, crop_mode="squash",
    )  # fmt: skip
    batch = torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in images])
    with torch.inference_mode():
        probs = torch.sigmoid(model(batch))[:, torch.as_tensor(goog_to_fall11())]
    return probs.topk(50, dim=1)


def test_explicit_settings_beat_the_preset():
    settings = LabelSettings(preset="coyo", activation="softmax", image_size=384)
    assert (settings.activation, settings.image_size) == ("softmax", 384)
    with pytest.raises(ValueError, match="unknown preset 'jft'"):
        LabelSettings(preset="jft")
    with pytest.raises(ValueError, match="activation must be one of"):
        LabelSettings(activation="relu")


def test_checkpoint_with_wrong_class_count_is_refused(tmp_path: Path):
    import timm

    path = tmp_path / "in1k.pth"
    torch.save(timm.create_model(demo.DEMO_MODEL, num_classes=1000).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit test_efficientnet with 21843 outputs"):
        load_model(LabelSettings(model=demo.DEMO_MODEL, checkpoint=str(path)))


def _label(folder: Path, out: Path, site, **settings) -> pl.DataFrame:
    base = {"preset": "timm", "model": demo.DEMO_MODEL, "checkpoint": str(site.checkpoint)}
    summary = label_shards(str(folder), str(out), LabelSettings(**{**base, **settings}))
    labels = pl.read_parquet(Path(summary.folder) / "*.parquet")
    return labels.filter(pl.col("error").is_null()).sort("id")


def test_compiled_model_gives_the_same_labels(site, shards, tmp_path: Path):
    """torch.compile, with the last batch padded to the static batch size (7 photos, batch 3)."""
    folder, photos = shards
    out = _label(folder, tmp_path / "out", site, precision="fp32", batch_size=3, compile=True)
    values, indices = _timm_reference(site.checkpoint, photos)
    assert out["labels"].to_list() == indices.tolist()
    got = torch.tensor(out["label_probs"].to_list())
    assert torch.allclose(got, values, atol=PROB_TOLERANCE, rtol=0)


DEVICE_DECODE_TOLERANCE = 2e-3  # torchvision's antialiased resize vs PIL's; 5e-4 measured


def test_decode_on_device_keeps_top1_and_imagehash(site, shards, tmp_path: Path):
    """The torchvision JPEG path (nvJPEG on CUDA; here its CPU twin) against the PIL path."""
    folder, _ = shards
    pil = _label(folder, tmp_path / "pil", site, precision="fp32", num_workers=0)
    dev = _label(folder, tmp_path / "dev", site, precision="fp32", decode_on_device=True)
    assert dev["id"].to_list() == pil["id"].to_list()
    # imagehash is the downloader's pHash from the sample's json: the labeler computes none
    assert dev["imagehash"].to_list() == pil["imagehash"].to_list()
    assert pil["imagehash"].to_list() == [f"{i - 1000:016x}" for i in pil["id"].to_list()]
    assert dev["labels"].list.first().to_list() == pil["labels"].list.first().to_list()
    diff = torch.tensor(dev["label_probs"].to_list()) - torch.tensor(pil["label_probs"].to_list())
    assert diff.abs().max().item() < DEVICE_DECODE_TOLERANCE


def test_weights_from_s3_are_fetched_once_and_label_the_same(site, shards, s3_bucket, tmp_path):
    import boto3

    folder, _ = shards
    url = f"s3://{s3_bucket}/weights/random_model.pth"
    boto3.client("s3").upload_file(str(site.checkpoint), s3_bucket, "weights/random_model.pth")
    cache = tmp_path / "cache"
    local = _label(folder, tmp_path / "local", site, precision="fp32")
    remote = _label(
        folder, tmp_path / "s3", site, precision="fp32", checkpoint=url, checkpoint_cache=str(cache)
    )
    assert remote["labels"].to_list() == local["labels"].to_list()
    cached = [p for p in cache.rglob("*") if p.is_file() and p.read_bytes()[:2] == b"PK"]
    assert [p.read_bytes() for p in cached] == [site.checkpoint.read_bytes()]
    assert local_checkpoint(url, str(cache)) == str(cached[0])  # a second run reads the copy

    with pytest.raises(FileNotFoundError, match="no such object"):
        local_checkpoint(f"s3://{s3_bucket}/weights/missing.pth", str(cache))
    with pytest.raises(FileNotFoundError, match="no such file"):
        local_checkpoint(str(tmp_path / "missing.pth"), str(cache))


def test_defaults_fit_the_device():
    settings = LabelSettings()
    assert settings.resolved_batch_size(torch.device("cpu")) == 32
    assert LabelSettings(batch_size=7).resolved_batch_size(torch.device("cuda")) == 7
    assert LabelSettings(precision="fp32").autocast_dtype(torch.device("cuda")) is None
    assert LabelSettings(precision="fp16").autocast_dtype(torch.device("cpu")) == torch.float16
    assert LabelSettings(precision="bf16").autocast_dtype(torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="chosen by measurement"):  # auto: calibrate.py
        settings.autocast_dtype(torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        LabelSettings(precision="fp8")


def test_calibration_keeps_the_faithful_precision_unless_another_is_clearly_faster():
    from coyo_platform.label.calibrate import pick

    cpu, cuda = ("fp32", "fp16", "bf16"), ("fp16", "bf16")
    assert pick({"fp32": 74.0, "fp16": 74.1, "bf16": 130.7}, cpu)[0] == "bf16"  # RESULTS.md
    assert pick({"fp32": 100.0, "fp16": 105.0, "bf16": 108.0}, cpu)[0] == "fp32"  # within 1.1x
    assert pick({"fp32": 50.0, "fp16": 90.0, "bf16": 95.0}, cpu)[0] == "bf16"  # the fastest
    assert pick({"fp16": 4000.0, "bf16": 4100.0}, cuda)[0] == "fp16"  # the card's, on a tie
    precision, why = pick({"fp16": 1000.0, "bf16": 1200.0}, cuda)
    assert precision == "bf16" and "fp16 1,000.0 img/s" in why and "bf16 1,200.0 img/s" in why


def test_precision_auto_is_measured_once_per_machine_and_model_and_the_first_choice_stays(
    site, shards, tmp_path: Path
):
    """``precision=auto`` on the CPU: the label program times fp32, fp16 and bf16 on the model
    and records its choice and figures in the run's metadata and in a per-machine cache; a second
    run reads the cache. A choice already recorded (another run's, on this machine) is used as
    it is, and is the labeler's precision: the calibration, not a CPU flag, decides it."""
    folder, _ = shards
    cache = tmp_path / "cache"
    settings = LabelSettings(
        preset="timm",
        model=demo.DEMO_MODEL,
        checkpoint=str(site.checkpoint),
        num_workers=0,
        checkpoint_cache=str(cache),
    )
    first = label_shards(str(folder), str(tmp_path / "a"), settings)
    [record] = (cache / "calibration").glob("*.json")
    found = json.loads(record.read_text())
    assert set(found["images_per_second"]) == {"fp32", "fp16", "bf16"}
    assert all(rate > 0 for rate in found["images_per_second"].values())
    assert first.fingerprint["precision"] == found["precision"] and found["batch_size"] == 32
    meta = first.metadata(settings)
    assert (
        meta["calibration"].startswith(found["precision"])
        and "measured: cpu: " in meta["calibration"]
    )
    assert "img/s" in meta["calibration"] and meta["batch_size"] == 32

    again = label_shards(str(folder), str(tmp_path / "b"), settings)
    assert again.labeler == first.labeler and "(cached: cpu: " in again.calibration

    other = "fp16" if found["precision"] != "fp16" else "fp32"  # as if another run chose it
    record.write_text(json.dumps({**found, "precision": other, "why": f"{other}: recorded"}))
    third = label_shards(str(folder), str(tmp_path / "c"), settings)
    assert third.fingerprint["precision"] == other and third.labeler != first.labeler
    assert third.calibration.startswith(f"{other}: recorded")

    # where a label set of this labeler exists already, auto keeps to its precision, whatever
    # the measurement says: partitions labeled elsewhere (a fresh container) join that set
    (Path(first.folder) / "00001.parquet").unlink()
    fourth = label_shards(str(folder), str(tmp_path / "a"), settings)
    assert fourth.labeler == first.labeler and fourth.shards_done == 1
    assert fourth.calibration.startswith(f"{found['precision']}: the precision of label set ")
    record.write_text("{not json")  # a broken record costs only the cache
    assert label_shards(str(folder), str(tmp_path / "d"), settings).labeled > 0


def test_grayscale_jpeg_and_bad_sample_json_are_per_image_results(site, tmp_path: Path):
    """A grayscale JPEG is labeled (on the device path too); a sample whose json is broken or
    not an object is a failed row with its reason, and the rest of the shard is labeled."""
    import io
    import tarfile

    photo = next(p for p in sorted(site.images.glob("*.jpg")) if p.stem.startswith("coffee"))
    gray = io.BytesIO()
    Image.open(photo).convert("L").save(gray, "JPEG", quality=90)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(
        folder / "00000.tar",
        [("000000000", photo.read_bytes(), {"id": 1}), ("000000001", gray.getvalue(), {"id": 2})],
    )
    with tarfile.open(folder / "00000.tar", "a") as tar:
        for key, meta in (("000000002", b"{not json"), ("000000003", b"[1, 2]")):
            for ext, data in (("jpg", photo.read_bytes()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    for decode_on_device in (False, True):
        out = tmp_path / f"out-{decode_on_device}"
        settings = LabelSettings(
            preset="timm",
            model=demo.DEMO_MODEL,
            checkpoint=str(site.checkpoint),
            decode_on_device=decode_on_device,
            num_workers=0,
        )
        summary = label_shards(str(folder), str(out), settings)
        assert (summary.labeled, summary.failed) == (2, 2)
        assert summary.failed_by_reason == {
            "sample json: JSONDecodeError": 1,
            "sample json: ValueError": 1,
        }
        rows = pl.read_parquet(Path(summary.folder) / "00000.parquet").sort("key")
        assert rows["id"].to_list() == [1, 2, None, None]
        assert rows["labels"].list.len().to_list() == [50, 50, None, None]


def test_weights_digest_covers_every_tensor_of_a_batchnorm_model():
    """Hub weights are identified by their content: every tensor, 0-dim BatchNorm counters
    included; one changed value changes the digest."""
    import timm

    from coyo_platform.label.weights import weights_digest

    model = timm.create_model(demo.DEMO_MODEL, num_classes=10)
    assert any(t.dim() == 0 for t in model.state_dict().values())  # num_batches_tracked
    first = weights_digest(model)
    assert weights_digest(model) == first and len(first) == 64
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] += 1e-3
    assert weights_digest(model) != first


def test_the_coyo_loader_decodes_jpegs_to_the_pixels_pil_gives(site):
    """The coyo preset's loader decodes RGB and greyscale JPEGs with libjpeg-turbo into a CHW
    tensor (no PIL image, no copy): the same pixels as PIL's ``convert("RGB")``; other images
    (a PNG here) go through PIL."""
    import io

    from coyo_platform.label.samples import decode, original_pixels

    photos = sorted(site.images.glob("*.jpg"))[:6] + sorted(site.images.glob("*.png"))[:1]
    gray = io.BytesIO()
    Image.open(photos[0]).convert("L").save(gray, "JPEG", quality=90)
    blobs = [p.read_bytes() for p in photos] + [gray.getvalue()]
    for data in blobs:
        got = decode("s", "k", {"jpg": data, "json": b'{"id": 1}'}, original_pixels, False)
        want = original_pixels(Image.open(io.BytesIO(data)).convert("RGB"))
        assert got["error"] is None
        assert got["input"].dtype == torch.uint8 and torch.equal(got["input"], want)


def test_a_broken_jpeg_for_the_device_is_that_images_error(site):
    """With decode_on_device, the coyo loader still decodes each JPEG once on the CPU, so a
    truncated one is a per-image error there, never a failure of the device's batch."""
    from coyo_platform.label.samples import decode, original_pixels

    broken = (site.images / "truncated.jpg").read_bytes()
    got = decode("s", "k", {"jpg": broken, "json": b'{"id": 1}'}, original_pixels, True)
    assert got["input"] is None and got["error"].startswith("decode:")
