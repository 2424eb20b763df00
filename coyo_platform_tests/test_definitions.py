"""The code location loads as Dagster loads it, and the two programs stay free of ``dagster``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def test_definitions_validate():
    done = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_assets_and_partitions():
    from coyo_platform.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {
        "coyo700m_metadata",
        "downloaded_shards",
        "labeled_shards",
        "label_stats",
        "coyo_labeled_300m",
    } <= keys
    job = defs.resolve_job_def("coyo_pipeline")
    assert job.partitions_def.name == "coyo_parts"


IMPORTS_NO_DAGSTER = """
import sys
import coyo_platform.worker.__main__, coyo_platform.worker.labeler
import coyo_platform.downloader.__main__, img2dataset
bad = sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')
             and m.split('.')[0] != 'dagster_pipes')
print(bad)
sys.exit(1 if bad else 0)
"""


def test_worker_and_downloader_import_no_dagster():
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_NO_DAGSTER], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stdout + done.stderr
