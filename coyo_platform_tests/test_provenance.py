"""Every output knows what made it: reruns reuse only what matches, a new labeler gets a label set
of its own (and the subset follows it), a changed source part is refused by name, the UI marks
what a change left behind, and two label sets can be compared.

The scenarios run ``coyo-platform`` as a user types it, on a copy of the session's CLI run
(``cli_run``: two parts, a random-weight test model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from coyo_platform.common import layout, provenance, shards
from coyo_platform.common.storage import Storage
from coyo_platform.download import fingerprint
from coyo_platform.download.settings import DownloadSettings
from coyo_platform_tests.conftest import BIN, REPO, CliRun, free_port, label_cmd, photo_shards

PARTS = ("part-00000", "part-00001")


class Copy:
    """A copy of the session's CLI run (data root and Dagster home) to change and rerun."""

    def __init__(self, cli_run: CliRun, tmp: Path) -> None:
        self.run, self.tmp = cli_run, tmp
        self.root, self.home = tmp / "data", tmp / "dagster_home"
        shutil.copytree(cli_run.root, self.root)
        shutil.copytree(cli_run.home, self.home)
        self.store = Storage(str(self.root))

    def cli(
        self, *args: str, source: Path | None = None, **flags: str
    ) -> subprocess.CompletedProcess:
        """``coyo-platform run`` as the session ran it, with some flags changed."""
        cmd = list(self.run.cmd)
        cmd[cmd.index("--data-root") + 1] = str(self.root)
        if source is not None:
            cmd[cmd.index("--source") + 1] = str(source)
        for flag, value in flags.items():
            name = "--" + flag.replace("_", "-")
            if name in cmd:
                cmd[cmd.index(name) + 1] = value
            else:
                cmd += [name, value]
        if args:  # other parts
            start = cmd.index("--parts") + 1
            end = next(i for i in range(start, len(cmd)) if cmd[i].startswith("--"))
            cmd[start:end] = list(args)
        env = {**os.environ, "DAGSTER_HOME": str(self.home)}
        return subprocess.run(cmd, env=env, capture_output=True, text=True)

    def coyo(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DAGSTER_HOME": str(self.home)}
        cmd = [str(BIN / "coyo-platform"), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True)

    def label_sets(self) -> list[str]:
        return layout.labelers(self.store)

    def files(self, labeler: str) -> dict[str, bytes]:
        """Every label file of a label set, by path below it."""
        base = self.root / "labeled_shards" / labeler
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.parquet"))}


def other_checkpoint(site, path: Path) -> Path:
    """The test model with other weights: another labeler."""
    weights = torch.load(site.checkpoint, weights_only=True)
    gen = torch.Generator().manual_seed(7)
    other = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in weights.items()
    }
    torch.save(other, path)
    return path


def step_lines(done: subprocess.CompletedProcess, step: str) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if f"] {step}" in line]


def test_changed_checkpoint_makes_a_new_label_set_the_subset_uses(cli_run, site, tmp_path):
    """Other weights: labeled anew into a set of their own, which stats, plan and subset then
    use; the first set is untouched. The same weights again, under another path: nothing is
    labeled, and the first set is the current one again."""
    copy = Copy(cli_run, tmp_path)
    [first] = copy.label_sets()
    before = copy.files(first)

    done = copy.cli(checkpoint=str(other_checkpoint(site, tmp_path / "other.pth")))
    assert done.returncode == 0, done.stdout + done.stderr
    second = next(s for s in copy.label_sets() if s != first)
    assert sorted(copy.label_sets()) == sorted([first, second])
    assert copy.files(first) == before  # the old set, byte for byte
    for part in PARTS:
        assert shards.current_labeler(copy.store, part) == second
        assert "images_labeled=0" not in step_lines(done, "labeled_shards")[PARTS.index(part)]
        labels = pl.read_parquet(shards.label_files(copy.store, part))
        subset = pq.read_table(copy.root / "coyo_labeled_300m" / f"{part}.parquet")
        assert subset.schema.metadata[b"coyo.labeler"] == second.encode()
        kept = labels.filter(pl.col("label_probs").list.first() >= 0.5)  # the run's --threshold
        got = pl.from_arrow(subset).sort("id")
        assert got["id"].to_list() == sorted(kept["id"].to_list())
        assert got["labels"].to_list() == kept.sort("id")["labels"].to_list()
        stats = json.loads((copy.root / "label_stats" / f"{part}.json").read_text())
        assert stats["labelers"] == [second]
    manifest = json.loads((copy.root / "coyo_labeled_300m" / ".coyo" / "manifest.json").read_text())
    assert manifest["labelers"] == [second] and manifest["complete"]
    record = json.loads((copy.root / "labeled_shards" / second / "_labeler.json").read_text())
    assert {p["weights_sha256"] for p in manifest["parts"]} == {record["weights_sha256"]}
    card = (copy.root / "coyo_labeled_300m" / "README.md").read_text()  # the dataset card
    assert f"- label set: `{second}`" in card
    assert f"- checkpoint sha256: {record['weights_sha256']}" in card
    assert f"- preset: {record['settings']['preset']}" in card
    assert f"- precision: {record['precision']}" in card
    assert all(len(p["source_sha256"]) == 64 for p in manifest["parts"])

    again = copy.cli(checkpoint=str(shutil.copy(site.checkpoint, tmp_path / "moved.pth")))
    assert again.returncode == 0, again.stdout + again.stderr
    assert all("images_labeled=0" in line for line in step_lines(again, "labeled_shards"))
    assert sorted(copy.label_sets()) == sorted([first, second])  # no third set
    assert {shards.current_labeler(copy.store, p) for p in PARTS} == {first}
    assert copy.files(first) == before


def test_one_part_relabeled_is_not_mixed_and_the_ui_shows_what_is_unsynced(cli_run, site, tmp_path):
    """Only part-00000 labeled by another labeler: the plan refuses to mix labelers (one line,
    exit 1, what to do), and the UI marks part-00000's subset unsynced, not part-00001's."""
    copy = Copy(cli_run, tmp_path)
    done = copy.cli("part-00000", checkpoint=str(other_checkpoint(site, tmp_path / "o.pth")))
    assert done.returncode == 1
    [failed] = [line for line in done.stderr.splitlines() if "FAILED" in line]
    assert "subset_plan" in failed and "2 labelers" in failed and "never mixes" in failed
    assert "Traceback" not in done.stdout + done.stderr

    stale = _stale_status(copy, "coyo_labeled_300m", list(PARTS))
    assert stale == {"part-00000": "STALE", "part-00001": "FRESH"}


def _stale_status(copy: Copy, asset: str, partitions: list[str]) -> dict[str, str]:
    """The webserver's answer (GraphQL, as the UI asks it) for each partition's sync status."""
    env = {**os.environ, "DAGSTER_HOME": str(copy.home), "COYO_DATA_ROOT": str(copy.root)}
    port = free_port()
    cmd = [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p"]
    server = subprocess.Popen(
        [*cmd, str(port)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    query = (
        "query Stale($key: [String!]!, $parts: [String!]!) "
        "{ assetNodes(assetKeys: [{path: $key}]) { staleStatusByPartition(partitions: $parts) } }"
    )
    variables = {"key": [asset], "parts": partitions}
    try:
        for _ in range(600):  # readiness, not a speed limit: the code location loads torch/timm
            assert server.poll() is None, "the webserver exited"
            try:
                body = json.dumps({"query": query, "variables": variables}).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as reply:
                    answer = json.load(reply)
                nodes = (answer.get("data") or {}).get("assetNodes")
                if nodes:
                    return dict(zip(partitions, nodes[0]["staleStatusByPartition"], strict=True))
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("no answer from the webserver")
    finally:
        server.terminate()
        server.wait()


def test_changed_source_part_is_refused_by_name_then_started_over(cli_run, tmp_path):
    """Another part-00000 (same rows, other URLs) under the same key: the download step fails at
    once, not retried, in one line naming the field and the command that starts the part over;
    that command, then the same run, downloads the new part."""
    copy = Copy(cli_run, tmp_path)
    source = tmp_path / "source"
    shutil.copytree(cli_run.source, source)
    [part] = sorted(source.glob("part-00000*.parquet"))
    frame = pl.read_parquet(part)
    frame.with_columns(pl.col("url") + "?v=2").write_parquet(part)

    done = copy.cli(source=source)
    assert done.returncode == 1
    [failed] = [line for line in done.stderr.splitlines() if "FAILED" in line]
    assert failed.startswith("[part-00000] downloaded_shards FAILED")
    assert "source.ids_and_urls_sha256=" in failed
    command = failed.split("To start over: ")[1]
    assert command == (
        f"coyo-platform clear --data-root {copy.root} --parts part-00000 --from downloaded_shards"
    )
    assert "Traceback" not in done.stdout + done.stderr
    assert 'File "' not in done.stdout + done.stderr  # no stack without -v
    assert _retries(copy, "downloaded_shards") == 0  # failed at once, not retried

    verbose = copy.cli("part-00000", "-v", source=source)
    assert verbose.returncode == 1
    assert 'provenance.py", line' in verbose.stderr  # the stack, where the mismatch was raised

    complete = copy.root / "downloaded_shards" / "_complete"
    assert sorted(p.name for p in complete.iterdir()) == ["part-00000.json", "part-00001.json"]
    cleared = copy.coyo(*command.split()[1:])
    assert cleared.returncode == 0, cleared.stderr
    assert not (copy.root / "downloaded_shards" / "part-00000").exists()
    assert (copy.root / "downloaded_shards" / "part-00001").exists()
    assert [p.name for p in complete.iterdir()] == ["part-00001.json"]  # the sensor reads it again
    rerun = copy.cli(source=source)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    subset = pl.read_parquet(copy.root / "coyo_labeled_300m" / "part-00000.parquet")
    assert subset.height > 0 and all(u.endswith("?v=2") for u in subset["url"])


def _retries(copy: Copy, step: str) -> int:
    """How many times the newest run asked to retry ``step``."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(copy.home)
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs(limit=1)
        events = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    return sum(1 for e in events if e.step_key == step)


@pytest.mark.parametrize("name", fingerprint.OUTPUT_SETTINGS, ids=list(fingerprint.OUTPUT_SETTINGS))
def test_each_download_mismatch_names_its_field(tmp_path: Path, name: str):
    store = Storage(str(tmp_path / "data"))
    folder = layout.shards(store, "part-00000")
    settings = DownloadSettings()
    recorded = {
        "source": {"rows": 10, "ids_and_urls_sha256": "a" * 64},
        "source_location": "s3://old/part-00000.parquet",
        "settings": {n: asdict(settings)[n] for n in fingerprint.OUTPUT_SETTINGS},
    }
    store.write_json(fingerprint.record_url(folder), recorded)
    Path(folder, "00000_stats.json").write_text("{}")  # a finished shard: something to reuse
    old = getattr(settings, name)
    changed = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.5}
    new = "center_crop" if isinstance(old, str) else changed[type(old)](old)
    wanted = {**recorded, "settings": {**recorded["settings"], name: new}}
    with pytest.raises(provenance.Mismatch) as raised:
        fingerprint.check_folder(store, folder, wanted)
    assert raised.value.field == f"settings.{name}"

    def shown(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    assert f"settings.{name}={shown(old)}, but this run asks for" in str(raised.value)
    assert f"asks for settings.{name}={shown(new)};" in str(raised.value)
    assert str(raised.value).endswith("--parts part-00000 --from downloaded_shards")
    # the same part read from elsewhere is the same part: reused
    moved = {**recorded, "source_location": "/mirror/part-00000.parquet"}
    assert fingerprint.check_folder(store, folder, moved) == recorded
    # settings that change how, not what, are not part of it
    faster = replace(settings, thread_count=8, timeout=3, retries=4)
    assert fingerprint.current_settings(faster) == recorded["settings"]


def test_labels_made_from_other_downloads_are_not_reused(site, tmp_path: Path):
    """A label set remembers the downloads it was made from: shards downloaded again (another
    fingerprint) under the same folder are not matched with the old labels."""
    shards_dir = photo_shards(site, tmp_path / "part-00000", 2, 3)
    (shards_dir / layout.FINGERPRINT).write_text(json.dumps({"source": {"rows": 6}}))
    out = tmp_path / "labeled_shards"
    first = subprocess.run(label_cmd(shards_dir, out, site.checkpoint), capture_output=True)
    assert first.returncode == 0, first.stderr
    (shards_dir / layout.FINGERPRINT).write_text(json.dumps({"source": {"rows": 7}}))
    again = subprocess.run(
        label_cmd(shards_dir, out, site.checkpoint), capture_output=True, text=True
    )
    assert again.returncode == 2
    assert "Traceback" not in again.stderr
    line = again.stderr.strip().splitlines()[-1]  # after the program's progress lines
    assert line.startswith("error: the labels in ") and "downloads=" in line
    assert line.endswith("--parts part-00000 --from labeled_shards")  # the labels, not the shards


def test_label_agreement_of_two_label_sets(cli_run, site, tmp_path):
    """``coyo-platform compare`` on the demo's labels and another checkpoint's: the figures are
    those counted here directly from the two sets."""
    copy = Copy(cli_run, tmp_path)
    [first] = copy.label_sets()
    done = copy.cli(checkpoint=str(other_checkpoint(site, tmp_path / "other.pth")))
    assert done.returncode == 0, done.stderr
    [second] = [s for s in copy.label_sets() if s != first]

    compared = copy.coyo(
        "compare", "--data-root", str(copy.root), "--baseline", first, "--candidate", second
    )
    assert compared.returncode == 0, compared.stderr
    result = json.loads((copy.root / "label_agreement" / f"{first}_vs_{second}.json").read_text())

    def labels(labeler: str) -> pl.DataFrame:
        files = [f for p in PARTS for f in shards.label_files(copy.store, p, labeler)]
        frame = pl.read_parquet(files).filter(pl.col("error").is_null())
        return frame.select("id", "labels", "label_probs")

    both = labels(first).join(labels(second), on="id", suffix="_b")
    top1 = (both["labels"].list.first() == both["labels_b"].list.first()).mean()
    top5 = [
        len(set(a[:5]) & set(b[:5])) / 5
        for a, b in zip(both["labels"], both["labels_b"], strict=True)
    ]
    diff = (both["label_probs"].list.first() - both["label_probs_b"].list.first()).abs().mean()
    total = result["total"]
    assert total["images"] == both.height > 0
    assert total["top1_agreement"] == pytest.approx(top1)
    assert total["top5_overlap"] == pytest.approx(sum(top5) / len(top5))
    assert total["top1_prob_mean_abs_diff"] == pytest.approx(diff, abs=1e-6)
    assert [p["partition"] for p in result["partitions"]] == list(PARTS)
    assert "label_agreement" in compared.stdout and "top1_agreement=" in compared.stdout


@pytest.mark.parametrize("key", ["", "..", "part-00000/..", "*"])
def test_clear_refuses_what_is_not_a_partition_key(tmp_path: Path, key: str):
    store = Storage(str(tmp_path))
    (tmp_path / "downloaded_shards" / "part-00000").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a partition key"):
        shards.clear_partition(store, key, "downloaded_shards")
    assert (tmp_path / "downloaded_shards" / "part-00000").exists()


def test_a_download_stopped_before_its_first_shard_may_rerun_with_other_settings(tmp_path):
    """No finished shard: nothing to reuse, so nothing to refuse; the new run's fingerprint
    (with a new ``made`` id) replaces the old one."""
    store = Storage(str(tmp_path))
    folder = layout.shards(store, "part-00000")
    old = {"source": {"rows": 3}, "settings": {"image_size": 512}}
    fingerprint.check_or_record(store, folder, old)
    first = store.read_json(fingerprint.record_url(folder))
    new = {"source": {"rows": 3}, "settings": {"image_size": 384}}
    fingerprint.check_or_record(store, folder, new)
    second = store.read_json(fingerprint.record_url(folder))
    assert second["settings"] == {"image_size": 384} and second["made"] != first["made"]
    Path(folder, "00000_stats.json").write_text("{}")  # now a shard is finished
    with pytest.raises(provenance.Mismatch, match="settings.image_size=384"):
        fingerprint.check_or_record(store, folder, old)


def test_only_bad_input_is_final_in_a_program(capsys):
    """From a shell, bad input ends the program with one ``error:`` line and status 2; any other
    error (a network outage, the hub unreachable) is raised as it is, for a retry."""
    from coyo_platform.common.reporting import open_reporter

    with pytest.raises(SystemExit) as ended, open_reporter():
        raise provenance.MissingInput("no shards (*.tar) under /x: download them first")
    assert ended.value.code == 2
    assert capsys.readouterr().err == "error: no shards (*.tar) under /x: download them first\n"
    with pytest.raises(FileNotFoundError, match="hub"), open_reporter():
        raise FileNotFoundError("the hub is unreachable and the file is not cached")
