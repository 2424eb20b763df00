"""``coyo-platform run``, as a newcomer runs it: a real process, a fresh SQLite instance, progress
lines, and materializations that ``dagster dev`` will show (the session's ``cli_run``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from coyo_platform.cli import steps
from coyo_platform.definitions import PIPELINE
from coyo_platform_tests.conftest import BIN, CliRun


def test_run_two_parts_with_limit(cli_run: CliRun):
    out, root = cli_run.done.stdout, cli_run.root
    for part in ("part-00000", "part-00001"):
        for asset in PIPELINE:
            assert f"[{part}] {asset.key.to_user_string()}" in out
        subset = pl.read_parquet(root / "coyo_labeled_300m" / f"{part}.parquet")
        assert subset.height <= 12
        assert (subset["label_probs"].list.first() >= 0.5).all()
        assert str(root / "coyo_labeled_300m" / f"{part}.parquet") in out
    assert pl.read_parquet(root / "coyo700m_metadata" / "part-00000.parquet").height == 12

    os.environ["DAGSTER_HOME"] = str(cli_run.home)
    try:
        instance = dg.DagsterInstance.get()
        assert set(instance.get_dynamic_partitions("coyo_parts")) == {"part-00000", "part-00001"}
        for asset in PIPELINE:
            done_parts = instance.get_materialized_partitions(asset.key)
            assert done_parts == {"part-00000", "part-00001"}, asset.key
    finally:
        del os.environ["DAGSTER_HOME"]


def test_steps_follow_the_asset_graph_in_the_order_the_lines_are_printed(cli_run: CliRun):
    """The step order is the asset graph's: every asset after all it depends on, partitioned
    steps part by part, and the progress lines in that order."""
    from coyo_platform.definitions import defs

    order = [(a, partitioned) for partitioned, group in steps() for a in group]
    graph = defs.resolve_asset_graph()
    seen: set = set()
    for asset, _ in order:
        assert graph.get(asset.key).parent_keys <= seen | {asset.key}, asset.key
        seen.add(asset.key)
    lines = [ln.split()[:2] for ln in cli_run.done.stdout.splitlines() if ln.startswith("[")]
    per_part = ["coyo700m_metadata", "downloaded_shards", "labeled_shards", "label_stats"]
    expected = [
        *([f"[part-0000{p}]", name] for p in (0, 1) for name in per_part),
        ["[all]", "label_stats_rollup"],
        ["[all]", "subset_plan"],
        *([f"[part-0000{p}]", "coyo_labeled_300m"] for p in (0, 1)),
        ["[all]", "subset_manifest"],
    ]
    assert [ln for ln in lines if ln[1] != "check"] == expected


def test_wds_writes_shards_and_later_runs_keep_them_current(cli_run: CliRun, tmp_path: Path):
    """``run --wds`` adds the webdataset shards and their manifest; a later run without the flag
    that changes the subset keeps the shards of the parts that have them current."""
    import json
    import shutil

    home, root = tmp_path / "home", tmp_path / "data"
    shutil.copytree(cli_run.home, home)  # the session's run, copied: other tests read it
    shutil.copytree(cli_run.root, root)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    cmd = [*cli_run.cmd, "--data-root", str(root)]
    manifest = root / "coyo_labeled_300m_wds" / ".coyo" / "manifest.json"

    def lines(done: subprocess.CompletedProcess) -> list[list[str]]:
        assert done.returncode == 0, done.stdout + done.stderr
        return [ln.split()[:2] for ln in done.stdout.splitlines() if ln.startswith("[")]

    wds = lines(subprocess.run([*cmd, "--wds"], env=env, capture_output=True, text=True))
    assert [ln for ln in wds if "wds" in ln[1]] == [
        ["[part-00000]", "coyo_labeled_300m_wds"],
        ["[part-00001]", "coyo_labeled_300m_wds"],
        ["[all]", "wds_manifest"],
    ]
    first = json.loads(manifest.read_text())
    subset = pl.read_parquet(root / "coyo_labeled_300m" / "*.parquet")
    assert first["complete"] and first["samples"] == subset.height > 0

    clear = [str(BIN / "coyo-platform"), "clear", "--parts", "part-00001", "--data-root", str(root)]
    cleared = subprocess.run(
        [*clear, "--from", "coyo_labeled_300m_wds"], env=env, capture_output=True, text=True
    )
    assert cleared.returncode == 0, cleared.stderr
    assert not (root / "coyo_labeled_300m_wds" / "part-00001").exists()
    assert (root / "coyo_labeled_300m" / "part-00001.parquet").exists()  # the subset stays

    cmd = [a for a in cmd if a not in ("--threshold", "0.5")]  # the target instead: fewer rows
    half = str(first["samples"] // 2)
    again = subprocess.run([*cmd, "--target-rows", half], env=env, capture_output=True, text=True)
    assert [ln for ln in lines(again) if "wds" in ln[1]] == [
        ["[part-00000]", "coyo_labeled_300m_wds"],
        ["[all]", "wds_manifest"],
    ]  # no --wds: the part that has shards kept current, as automation keeps it; not the other
    assert "[all] check wds_complete FAILED (WARN)" in again.stdout  # said; the run goes on
    after = json.loads(manifest.read_text())
    part = pl.read_parquet(root / "coyo_labeled_300m" / "part-00000.parquet")
    assert after["problems"] == ["part-00001: no webdataset shards"]
    assert after["samples"] == part.height and not after["complete"]
    total = pl.read_parquet(root / "coyo_labeled_300m" / "*.parquet").height
    assert total == int(half)  # the new target, in the subset


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "1.5"], "threshold must be in [0, 1]"),
        (["--model", "tf_efficientnetv2_xxl"], "unknown model 'tf_efficientnetv2_xxl'"),
        (["--allow-networks", "intranet"], "'intranet' is not an IP network"),
        (["--threshold", "0.2", "--target-rows", "9"], "give one of threshold, target_rows"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path: Path, flags: list[str], message):
    done = subprocess.run(
        [str(BIN / "coyo-platform"), "run", "--parts", "part-00000", *flags],
        env={**os.environ, "DAGSTER_HOME": str(tmp_path / "h")},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "h").exists() and not (tmp_path / "data").exists()


def test_an_image_server_down_fails_the_run_in_one_line_and_a_rerun_gets_the_images(
    site, tmp_path: Path
):
    """``coyo-platform run`` with every image URL unreachable: the download step fails (after
    the retry policy's tries), one line naming the outage, exit 1, nothing marked done. The same
    command with the server back downloads, labels and keeps the images."""
    import functools
    import http.server
    import threading

    from coyo_platform import demo
    from coyo_platform_tests.conftest import LOOPBACK, free_port

    port = free_port()
    source = tmp_path / "source"
    demo.write_parts(source, site.images, site.items, f"http://127.0.0.1:{port}", 1, 12)
    cmd = [
        str(BIN / "coyo-platform"), "run", "--source", str(source), "--parts", "part-00000",
        "--data-root", str(tmp_path / "data"), "--model", demo.DEMO_MODEL,
        "--checkpoint", str(site.checkpoint), "--preset", "timm", "--allow-networks", LOOPBACK,
        "--shard-retries", "0", "--outage-backoff", "0",
    ]  # fmt: skip
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    down = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert down.returncode == 1
    [failed] = [line for line in down.stderr.splitlines() if "FAILED" in line]
    assert failed.startswith("[part-00000] downloaded_shards FAILED after")
    assert "rows failed transiently (download: connection refused" in failed
    assert "likely cause: the network" in failed
    assert not list((tmp_path / "data" / "downloaded_shards").rglob("*_stats.json"))

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=site.images)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        server.shutdown()
        server.server_close()
    assert up.returncode == 0, up.stdout + up.stderr
    subset = pl.read_parquet(tmp_path / "data" / "coyo_labeled_300m" / "part-00000.parquet")
    downloads = pl.read_parquet(
        tmp_path / "data" / "downloaded_shards" / "part-00000" / "*.parquet"
    )
    assert downloads.filter(pl.col("status") == "success").height > 0
    assert subset.height > 0 and subset["id"].is_unique().all()
