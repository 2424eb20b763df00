"""The Dagster UI, looked at as a person would: after a small run by ``coyo-platform run`` (the
session's ``cli_run``), the webserver on loopback over that instance, opened in headless Chromium
(Debian's ``chromium``, installed by ``make test``). Screenshots land in the test's temp folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from coyo_platform.definitions import PIPELINE
from coyo_platform_tests.conftest import BIN, REPO, CliRun
from coyo_platform_tests.conftest import free_port as _free_port


def _chromium(*args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    assert browser, "Debian's chromium is missing: `make test` installs it"
    return subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
         "--virtual-time-budget=20000", "--window-size=1400,1000", *args],
        capture_output=True, text=True,
    )  # fmt: skip


@pytest.fixture
def webserver(cli_run: CliRun):
    env = {**os.environ, "DAGSTER_HOME": str(cli_run.home), "COYO_DATA_ROOT": str(cli_run.root),
           "COYO_SOURCE": str(cli_run.source)}  # fmt: skip
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # readiness, not a speed limit: the code location loads torch/timm
            assert server.poll() is None, "the webserver exited"
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait()


def test_asset_graph_and_label_stats_in_a_real_browser(webserver: str, tmp_path: Path):
    graph = tmp_path / "asset_graph.png"
    page = f"{webserver}/asset-groups/coyo_labeled_300m"
    assert _chromium(f"--screenshot={graph}", page).returncode == 0
    dom = _chromium("--dump-dom", page).stdout
    for asset in PIPELINE:
        assert asset.key.to_user_string() in dom, f"{asset.key} missing from the asset graph"
    with Image.open(graph) as shot:
        assert shot.size == (1400, 1000)
        assert len(set(shot.convert("L").resize((64, 64)).tobytes())) > 8, "a blank page"

    stats = tmp_path / "label_stats.png"
    page = f"{webserver}/assets/label_stats"
    assert _chromium(f"--screenshot={stats}", page).returncode == 0
    dom = _chromium("--dump-dom", page).stdout
    # the card's threshold table, rendered from the markdown as a table, and the chart image
    assert "<table" in dom
    assert "labels per image" in dom and "share kept" in dom
    for threshold in ("0.05", "0.10", "0.15", "0.20", "0.25"):
        assert threshold in dom
    assert stats.stat().st_size > 10_000
