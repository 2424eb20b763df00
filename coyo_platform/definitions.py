"""The one place that wires assets, jobs and resources. The deployment (``COYO_ENV``) picks the
storage and compute seams; ``local`` is the embedded default: a local folder, subprocesses."""

from __future__ import annotations

import os

import dagster as dg

from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
from coyo_platform.assets.coyo_labeled_300m import card_schema, coyo_labeled_300m
from coyo_platform.assets.coyo_labeled_300m_wds import coyo_labeled_300m_wds
from coyo_platform.assets.downloaded_shards import download_success_rate, downloaded_shards
from coyo_platform.assets.label_agreement import label_agreement
from coyo_platform.assets.label_names import label_names
from coyo_platform.assets.label_stats import label_stats
from coyo_platform.assets.label_stats_rollup import label_stats_rollup
from coyo_platform.assets.labeled_shards import label_coverage, labeled_shards
from coyo_platform.assets.subset_manifest import subset_manifest
from coyo_platform.assets.subset_plan import subset_plan
from coyo_platform.assets.wds_manifest import wds_manifest
from coyo_platform.ingest.sources import HUB_SOURCE
from coyo_platform.resources import EcsCompute, LocalCompute, SourceResource, StorageResource
from coyo_platform.sensors import (
    coyo_ingest,
    coyo_label,
    coyo_parts_sensor,
    unlabeled_shards_sensor,
)

#: The partitioned assets, in the order a partition flows through them.
PIPELINE = [coyo700m_metadata, downloaded_shards, labeled_shards, label_stats, coyo_labeled_300m]
#: The unpartitioned assets over all partitions: stats roll-up, the sampling plan (threshold,
#: dedup, caps), the subset's manifest, and the label names and hierarchy.
ROLLUPS = [label_stats_rollup, subset_plan, subset_manifest, label_names]
#: The training-ready copy of the kept images, started by a person (a large copy), then kept
#: current by automation: webdataset shards per partition and their manifest.
TRAINING = [coyo_labeled_300m_wds, wds_manifest]
#: Materialized by a person only: two label sets compared.
COMPARISONS = [label_agreement]
#: Where a user looks first: downloads' success rate (warns), label coverage and the subset's
#: schema (blocking: nothing downstream is built on them when they fail).
CHECKS = [download_success_rate, label_coverage, card_schema]

coyo_pipeline = dg.define_asset_job(
    "coyo_pipeline",
    selection=PIPELINE,
    description="Metadata, download, labels, stats and subset for the selected COYO parts.",
)

#: The transient failures of finished shards fetched again (``retry_failed``), from the UI: launch
#: it for one partition or backfill it over many; the sensor then labels the new images. The
#: download settings that change the bytes are the partition's own, whatever this config says.
coyo_retry_failed = dg.define_asset_job(
    "coyo_retry_failed",
    selection=[downloaded_shards],
    config={"ops": {"downloaded_shards": {"config": {"retry_failed": True}}}},
    description="Fetch again the rows of finished shards that failed transiently (timeouts, "
    "5xx, resets, DNS hiccups); the shards gain those images, nothing else is fetched.",
)


def local_resources(source: str | None = None, data_root: str | None = None) -> dict:
    """Embedded defaults: ``COYO_SOURCE`` (else the hub), ``COYO_DATA_ROOT`` (else ./data)."""
    return {
        "source": SourceResource(location=source or os.environ.get("COYO_SOURCE", HUB_SOURCE)),
        "storage": StorageResource(root=data_root or os.environ.get("COYO_DATA_ROOT", "./data")),
        "compute": LocalCompute(),
    }


def aws_resources() -> dict:
    """AWS: storage on S3, the two programs as ECS tasks (``EcsCompute``). Every
    value comes from the environment, which the Dagster service's task definition in
    ``infra/coyo-platform.yaml`` sets from the stack's own resources; credentials come from the
    task's IAM role (the standard AWS chain), never from here."""
    return {
        "source": SourceResource(location=os.environ.get("COYO_SOURCE", HUB_SOURCE)),
        "storage": StorageResource(root=dg.EnvVar("COYO_DATA_ROOT")),
        "compute": EcsCompute(
            cluster=dg.EnvVar("COYO_ECS_CLUSTER"),
            subnets=dg.EnvVar("COYO_ECS_SUBNETS"),
            security_groups=dg.EnvVar("COYO_ECS_SECURITY_GROUPS"),
            pipes_bucket=dg.EnvVar("COYO_PIPES_BUCKET"),
            download_task_definition=dg.EnvVar("COYO_DOWNLOAD_TASK_DEFINITION"),
            label_task_definition=dg.EnvVar("COYO_LABEL_TASK_DEFINITION"),
            cpu_capacity_provider=dg.EnvVar("COYO_CPU_CAPACITY_PROVIDER"),
            gpu_capacity_provider=dg.EnvVar("COYO_GPU_CAPACITY_PROVIDER"),
        ),
    }


DEPLOYMENTS = {"local": local_resources, "aws": aws_resources}


def resources_for(env: str | None = None) -> dict:
    env = env or os.environ.get("COYO_ENV", "local")
    if env not in DEPLOYMENTS:
        raise ValueError(f"unknown COYO_ENV {env!r}; known: {', '.join(DEPLOYMENTS)}")
    return DEPLOYMENTS[env]()


defs = dg.Definitions(
    assets=[*PIPELINE, *ROLLUPS, *TRAINING, *COMPARISONS],
    asset_checks=CHECKS,
    jobs=[coyo_pipeline, coyo_ingest, coyo_label, coyo_retry_failed],
    sensors=[coyo_parts_sensor, unlabeled_shards_sensor],
    resources=resources_for(),
)
