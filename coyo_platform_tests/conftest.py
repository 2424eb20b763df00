"""Shared fixtures: real photos on a real HTTP server on loopback, COYO-700M-schema parts that
point at it, a small timm model with random weights saved to a checkpoint (nothing is
downloaded), the two programs' command lines, and two runs made once per session and read by
every end-to-end test that only looks at outputs: the pipeline in process (``pipeline_run``) and
``coyo-platform run`` as a user types it (``cli_run``)."""

from __future__ import annotations

import os

# Retry delays are a setting; under test they are 0 (the backoff itself is tested once, in
# test_definitions.py). Set before any coyo_platform.assets import, which reads it.
os.environ.setdefault("COYO_RETRY_DELAY_SECONDS", "0")

import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402
import pytest  # noqa: E402

from coyo_platform import demo  # noqa: E402

ROWS = 45  # rows per test part: every catalogue item at least once, several shards of 20
SHARD_SIZE = 20
LOOPBACK = demo.LOOPBACK
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PART = "part-00000"


@dataclass
class Site:
    images: Path
    items: list[demo.Item]
    base_url: str
    checkpoint: Path


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("site")
    items = demo.write_images(root / "images")
    checkpoint = demo.make_random_model(root / "random_model.pth", root / "images")
    with demo.serve_folder(root / "images") as base_url:
        yield Site(root / "images", items, base_url, checkpoint)


def write_source(site: Site, folder: Path) -> Path:
    """A source folder with two parts, ``part-00000`` and ``part-00001``."""
    demo.write_parts(folder, site.images, site.items, site.base_url, parts=2, rows=ROWS)
    return folder


@pytest.fixture
def source(site: Site, tmp_path: Path) -> Path:
    return write_source(site, tmp_path / "source")


def expected_outcomes(part: pl.DataFrame, items: list[demo.Item]) -> Counter:
    """What each row of a demo part should become: 'photo' or its failure, by the catalogue."""
    kinds = {item.name: item.kind for item in items}
    outcomes: Counter = Counter()
    for url in part["url"]:
        name = url.rsplit("/", 1)[-1].split("?")[0]
        outcomes[kinds.get(name, "connection refused")] += 1
    return outcomes


def fast_run_config(checkpoint: Path) -> dict:
    """Settings sized for a 2-core machine; everything else is the product's default."""
    return {
        "ops": {
            "downloaded_shards": {
                "config": {
                    "processes_count": 1,
                    "thread_count": 8,
                    "number_sample_per_shard": SHARD_SIZE,
                    "allow_networks": [LOOPBACK],  # the image server; public-only by default
                }
            },
            "labeled_shards": {
                "config": {
                    "preset": "timm",
                    "model": demo.DEMO_MODEL,
                    "checkpoint": str(checkpoint),
                    "num_workers": 1,
                    "batch_size": 16,
                }
            },
        }
    }


# ---------------------------------------------------------------- the two programs


def program_cmd(program: str, *args: str) -> list[str]:
    """``python -m coyo_platform.<program> *args``, as the compute seam starts it."""
    return [sys.executable, "-m", f"coyo_platform.{program}", *args]


def label_cmd(shards: Path, out: Path | str, checkpoint: Path, *extra: str) -> list[str]:
    """The label program on ``shards`` with the tiny random-weight test model."""
    return program_cmd(
        "label",
        "--shards", str(shards), "--output", str(out), "--preset", "timm",
        "--model", demo.DEMO_MODEL, "--checkpoint", str(checkpoint), *extra,
    )  # fmt: skip


HAND_LABELER = "hand-labeled-000000000000"


def hand_label_folder(root: Path, key: str, labeler: str = HAND_LABELER) -> Path:
    """A partition's folder in a label set written by a test (not by the label program), made
    the partition's current one, as the label program would once it finished."""
    from coyo_platform.common import layout, shards
    from coyo_platform.common.storage import Storage

    store = Storage(str(root))
    sets = Storage(layout.label_sets(store))
    record = layout.labeler_record(sets.root, labeler)
    if not sets.exists(record):
        sets.write_json(record, {"labeler": labeler, "weights_sha256": "0" * 64})
    shards.set_current_labels(sets, key, {"labeler": labeler})
    folder = Path(layout.labels(store, key, labeler))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def label_folder(root: Path) -> Path:
    """The one partition folder of the one label set under a label program's ``--output``."""
    folders = [p for p in root.glob("*/*") if p.is_dir() and p.parent.name != "_current"]
    assert len(folders) == 1, f"expected one label set with one partition, found {folders}"
    return folders[0]


def label_parquets(root: Path) -> list[Path]:
    """The labeled shards written so far under a label program's ``--output``."""
    return sorted(p for p in root.glob("*/*/*.parquet") if p.parent.parent.name != "_current")


def download_cmd(metadata: Path, out: Path, *extra: str) -> list[str]:
    """The download program on one part's metadata, one process (a 2-core machine)."""
    return program_cmd(
        "download", "--metadata", str(metadata), "--output", str(out),
        "--processes-count", "1", *extra,
    )  # fmt: skip


# ---------------------------------------------------------------- runs shared by the session


@dataclass
class PipelineRun:
    """The pipeline in process for ``part-00000`` on a local folder, then the stats roll-up."""

    result: object  # dg.ExecuteInProcessResult of the pipeline and its checks
    root: Path
    source: Path
    resources: dict
    instance: object


def materialize_pipeline(instance, resources: dict, checkpoint: Path, **options):
    """Every partitioned asset and its checks for ``part-00000``, sized for a 2-core machine."""
    import dagster as dg

    from coyo_platform.definitions import CHECKS, PIPELINE

    instance.add_dynamic_partitions("coyo_parts", [PART])
    return dg.materialize(
        [*PIPELINE, *CHECKS],
        partition_key=PART,
        instance=instance,
        resources=resources,
        run_config=fast_run_config(checkpoint),
        **options,
    )


@pytest.fixture(scope="session")
def pipeline_run(site: Site, tmp_path_factory: pytest.TempPathFactory):
    import dagster as dg

    from coyo_platform.definitions import label_stats_rollup, local_resources

    tmp = tmp_path_factory.mktemp("pipeline_run")
    source = write_source(site, tmp / "source")
    resources = local_resources(source=str(source), data_root=str(tmp / "data"))
    with dg.instance_for_test() as instance:
        result = materialize_pipeline(instance, resources, site.checkpoint)
        assert result.success
        assert dg.materialize([label_stats_rollup], instance=instance, resources=resources).success
        yield PipelineRun(result, tmp / "data", source, resources, instance)


def cli_run_cmd(site: Site, source: Path, root: Path) -> list[str]:
    """``coyo-platform run`` over two parts of the test source, as a user types it."""
    return [
        str(BIN / "coyo-platform"), "run", "--source", str(source),
        "--parts", "part-00000", "part-00001", "--limit", "12", "--data-root", str(root),
        "--model", demo.DEMO_MODEL, "--checkpoint", str(site.checkpoint), "--preset", "timm",
        "--threshold", "0.5", "--allow-networks", LOOPBACK,
    ]  # fmt: skip


@dataclass
class CliRun:
    done: subprocess.CompletedProcess
    home: Path  # its DAGSTER_HOME
    root: Path
    source: Path
    cmd: list[str]


@pytest.fixture(scope="session")
def cli_run(site: Site, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    tmp = tmp_path_factory.mktemp("cli_run")
    home, root, source = tmp / "dagster_home", tmp / "data", write_source(site, tmp / "source")
    cmd = cli_run_cmd(site, source, root)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return CliRun(done, home, root, source, cmd)


#: With ``-n`` (``make test``), test files go to the test processes whole (``--dist loadfile``),
#: and the files that read one of the session's runs go together, so each run is made once.
SHARED_RUNS = {
    "test_cli.py": "cli_run",
    "test_ui.py": "cli_run",
    "test_kill_resume.py": "cli_run",
    "test_provenance.py": "cli_run",
    "test_pipeline.py": "pipeline_run",
    "test_s3.py": "pipeline_run",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with :data:`SHARED_RUNS`'s files grouped. (xdist's own grouping by
    mark, ``loadgroup``, does nothing under pytest 9.2: pytest-dev/pytest-xdist#1386.)"""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RunsThenFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return SHARED_RUNS.get(file.rsplit("/", 1)[-1], file)

    return RunsThenFiles(config, log)


# ---------------------------------------------------------------- S3 on loopback


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's server), for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the standard AWS variables point every client (boto3, s3fs, subprocesses)
    at the loopback server with throwaway credentials."""
    import uuid

    import boto3

    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"coyo-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    """A webdataset shard as img2dataset writes it: ``key.jpg`` + ``key.json`` per sample."""
    import io
    import json
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, image, meta in samples:
            for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def photo_shards(site: Site, folder: Path, shards: int, per_shard: int) -> Path:
    """``shards`` webdataset tars of ``per_shard`` real photos each, ids ``s * 100 + i``."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [p.read_bytes() for p in sorted(site.images.glob("*.jpg"))[:per_shard]]
    for s in range(shards):
        samples = [(f"{s:05d}{i:04d}", p, {"id": s * 100 + i}) for i, p in enumerate(photos)]
        write_tar(folder / f"{s:05d}.tar", samples)
    return folder


def without_dagster(folder: Path) -> dict[str, str]:
    """An environment in which ``import dagster`` fails, as in the programs image (which has
    only ``dagster_pipes``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster.py").write_text("raise ImportError('dagster is not in the programs image')")
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}
