"""No secret in logs, metadata or storage; nothing unpickled from storage; no asset output goes
through a (pickling) IO manager.

The pipeline runs for one partition with its storage root on S3 (moto's S3 server on loopback)
under distinctive fake credentials, session token included, as an ECS task role's are. Then every
place a secret could end up is read back: every record of the Dagster instance's event log (logs,
Pipes messages, materialization metadata), the run records, every file of the instance's folder
(its SQLite databases and compute logs), the terminal output of the run and of the download and
label subprocesses, and every object in the bucket (parquet decoded, so compression hides
nothing)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import boto3
import dagster as dg
import pyarrow.parquet as pq
import pytest
import torch
from dagster._serdes import serialize_value

from coyo_platform.definitions import (
    COMPARISONS,
    PIPELINE,
    ROLLUPS,
    TRAINING,
    defs,
    local_resources,
)
from coyo_platform_tests.conftest import materialize_pipeline
from coyo_platform_tests.test_bad_input import one_shard, run_label

PART = "part-00000"
# Letters and digits only, so that a URL-encoded or JSON-escaped copy is still the same string.
ACCESS_KEY_ID = "TESTCOYOSECURITYKEY7"  # fake, and not shaped like a real AKIA key id
SECRET_KEY = "COYOsecretKEYdoNOTleak0f3c9a27e51b4d8"
SESSION_TOKEN = "COYOsessionTOKENdoNOTleak5e1b0a9c7d2f3"
SECRETS = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": SESSION_TOKEN}


class RefusingIOManager(dg.ConfigurableIOManager):
    """Fails the step if any asset hands it a value: the default IO manager would pickle it."""

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        raise AssertionError(f"{context.asset_key}: an output went to the IO manager ({obj!r})")

    def load_input(self, context: dg.InputContext):
        raise AssertionError(f"{context.asset_key}: an input was loaded from the IO manager")


def _bucket_texts(bucket: str) -> dict[str, str]:
    """Every object's bytes as text; a parquet file also decoded (rows and schema metadata)."""
    import io

    s3 = boto3.client("s3")
    texts = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            text = data.decode("latin-1")
            if obj["Key"].endswith(".parquet"):
                table = pq.read_table(io.BytesIO(data))
                text += repr(table.schema.metadata) + repr(table.to_pylist())
            texts[f"s3://{bucket}/{obj['Key']}"] = text
    return texts


def _folder_texts(folder: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()}


def _where(value: str, places: dict[str, str]) -> list[str]:
    return sorted(name for name, text in places.items() if value in text)


def test_no_credential_in_logs_metadata_or_storage(
    site, source, s3_bucket, monkeypatch: pytest.MonkeyPatch, capfd, tmp_path: Path
):
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem cached with earlier credentials
    root = f"s3://{s3_bucket}/coyo"
    resources = {
        **local_resources(source=str(source), data_root=root),
        "io_manager": RefusingIOManager(),
    }
    # The credentials in effect are these: an address signed with them carries the token.
    signed = resources["storage"].store().presigned_url(f"{root}/probe.png", 60)
    assert SESSION_TOKEN in signed and ACCESS_KEY_ID in signed

    home = tmp_path / "dagster"
    home.mkdir()
    try:
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            pipeline = materialize_pipeline(
                instance, resources, site.checkpoint, raise_on_error=False
            )
            rollups = dg.materialize(
                ROLLUPS, instance=instance, resources=resources, raise_on_error=False
            )
            # the webdataset shards of the kept images, from the subset under the plan now
            shards, shards_manifest = (
                dg.materialize(
                    assets,
                    partition_key=part,
                    instance=instance,
                    resources=resources,
                    raise_on_error=False,
                )
                for assets, part in (([PIPELINE[-1], TRAINING[0]], PART), (TRAINING[1:], None))
            )
            runs = instance.get_runs()
            events = {
                f"event log of run {run.run_id}": "\n".join(
                    serialize_value(entry) for entry in instance.all_logs(run.run_id)
                )
                for run in runs
            }
            records = {f"run record {run.run_id}": serialize_value(run) for run in runs}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    out, err = capfd.readouterr()
    for result in (pipeline, rollups, shards, shards_manifest):
        failures = [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
        assert result.success, "\n".join(f.to_string() for f in failures if f) + err[-3000:]

    # what was read is the real thing: the run's logs, Pipes messages and metadata
    pipes = events[f"event log of run {pipeline.run_id}"]
    assert "images_labeled" in pipes and "labeling " in pipes and "threshold_table" in pipes
    assert "-m coyo_platform.label" in pipes and "-m coyo_platform.download" in pipes
    assert (
        "STEP_SUCCESS" in err
    )  # Dagster's console log, and the programs' own output, were captured

    places = {
        **events,
        **records,
        **_folder_texts(home),
        "stdout": out,
        "stderr": err,
        **_bucket_texts(s3_bucket),
    }
    # The key id is not secret (AWS prints it in consoles and logs), but it names the account's
    # credentials: it appears nowhere either.
    credentials = {**SECRETS, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID}
    leaks = {name: _where(value, places) for name, value in credentials.items()}
    assert leaks == {name: [] for name in credentials}, leaks

    # the stats chart is still recorded by its path; on S3 it is not linked inline under
    # temporary credentials, whose presigned address would carry the session token
    [stats] = pipeline.asset_materializations_for_node("label_stats")
    assert stats.metadata["chart"].value == f"{root}/label_stats/{PART}.png"
    assert "chart_image" not in stats.metadata

    # every asset of the definitions was materialized here, so each was checked against the
    # refusing IO manager
    materialized = {
        e.asset_key
        for result in (pipeline, rollups, shards, shards_manifest)
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    }  # fmt: skip
    # (but label_agreement, which needs two label sets: test_provenance materializes it)
    compared = {key for asset in COMPARISONS for key in asset.keys}
    assert materialized == {key for asset in defs.assets for key in asset.keys} - compared

    # no asset output was stored by an IO manager (the default one pickles)
    handled = [
        e.event_type_value
        for result in (pipeline, rollups, shards, shards_manifest)
        for e in result.all_events
        if e.event_type_value in ("HANDLED_OUTPUT", "LOADED_INPUT")
    ]
    assert handled == []


def test_every_asset_module_is_in_the_definitions():
    """Every asset defined in ``coyo_platform/assets/`` is wired into the definitions (so the
    run above, which materializes all of them, checked each against the refusing IO manager),
    and the run above materializes exactly the definitions' assets."""
    import importlib
    import pkgutil

    import coyo_platform.assets as package

    defined = set()
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        defined |= {
            key
            for value in vars(module).values()
            if isinstance(value, dg.AssetsDefinition)
            for key in value.keys
        }
    assert defined == {key for asset in defs.assets for key in asset.keys}
    wired = [*PIPELINE, *ROLLUPS, *TRAINING, *COMPARISONS]
    assert {key for asset in wired for key in asset.keys} == defined

    @dg.asset
    def returns_a_value() -> int:
        return 1

    with dg.instance_for_test() as instance:  # and the refusal is real
        result = dg.materialize(
            [returns_a_value],
            instance=instance,
            resources={"io_manager": RefusingIOManager()},
            raise_on_error=False,
        )
    assert not result.success


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: stands for any code a pickle may run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_checkpoint_is_refused_and_never_run(site, tmp_path: Path):
    # the payload is live: plain unpickling runs it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(str(proof))))
    assert proof.is_dir()

    # a checkpoint as torch.save writes it, with real weights and the payload beside them
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pth"
    weights = torch.load(site.checkpoint, weights_only=True)
    torch.save({"state_dict": weights, "extra": _Payload(str(marker))}, evil)

    done = run_label(one_shard(site, tmp_path), tmp_path / "out", evil)
    assert done.returncode != 0
    refused = f"checkpoint {evil}: refused: loading it needs pickled code ({os.mkdir.__module__}"
    assert refused + ".mkdir)" in done.stderr, done.stderr[-3000:]
    assert "safetensors" in done.stderr
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


UNPICKLERS = {"pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal", "_pickle"}


def test_no_code_in_the_package_unpickles():
    """No module of the package imports a pickle library, calls ``torch.load`` (weights go
    through timm's ``load_state_dict``, which passes ``weights_only=True``), ``read_pickle``,
    ``np.load(allow_pickle=True)``, or passes ``weights_only=False`` to anything."""
    import ast

    package = Path(__file__).resolve().parents[1] / "coyo_platform"
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            bad = None
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom):
                    names.append(node.module or "")
                bad = next((n for n in names if n.split(".")[0] in UNPICKLERS), None)
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute):
                    owner = func.value.id if isinstance(func.value, ast.Name) else ""
                    if (owner, func.attr) == ("torch", "load") or func.attr == "read_pickle":
                        bad = f"{owner}.{func.attr}"
                for keyword in node.keywords:
                    value = getattr(keyword.value, "value", None)
                    if (keyword.arg, value) in (("weights_only", False), ("allow_pickle", True)):
                        bad = f"{keyword.arg}={value}"
            if bad:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {bad}")
    assert found == []
