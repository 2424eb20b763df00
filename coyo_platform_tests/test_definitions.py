"""The code location loads as Dagster loads it, the stage packages and the two programs stay free
of ``dagster``, and steps that run a program retry with backoff."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "coyo_platform"
#: The Dagster-free stage packages (the programs' and what they import).
STAGES = ("common", "ingest", "download", "label", "stats", "sample")


def test_definitions_validate(tmp_path: Path):
    done = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},  # a fresh instance, wherever run
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
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')
             and m.split('.')[0] != 'dagster_pipes')
print(bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("program", ["download", "label"])
def test_each_program_imports_no_dagster(program: str):
    """Every module of the program's package, and all they import, without ``dagster`` (the
    programs image has only ``dagster_pipes``)."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_NO_DAGSTER, f"coyo_platform.{program}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_stage_packages_import_no_dagster_and_no_orchestration():
    """The stage logic takes paths and values: no module of a stage package imports dagster
    (dagster_pipes aside) or the orchestration modules (assets, resources, definitions...)."""
    wiring = ("assets", "resources", "definitions", "sensors", "partitions", "cli")
    found = []
    for stage in STAGES:
        for path in sorted((PACKAGE / stage).rglob("*.py")):
            for name in _imported(path):
                parts = name.split(".")
                ours = parts[0] == "coyo_platform" and len(parts) > 1 and parts[1] in wiring
                if parts[0] == "dagster" or ours:
                    found.append(f"{path.relative_to(REPO)}: {name}")
    assert found == []


def test_transient_retries_back_off_exponentially_with_jitter(monkeypatch):
    """The one test of the backoff itself (the suite runs with a zero delay): by default the
    retries come after 0-20 s, then 20-40 s."""
    import dagster as dg
    from dagster._core.definitions.policy import calculate_delay

    from coyo_platform.assets import RETRY_DELAY_VARIABLE, TRANSIENT_RETRIES, transient_retries

    assert TRANSIENT_RETRIES.delay == 0  # what the suite runs with (conftest)
    monkeypatch.delenv(RETRY_DELAY_VARIABLE)
    policy = transient_retries()
    assert (policy.max_retries, policy.delay) == (2, 10)
    assert (policy.backoff, policy.jitter) == (dg.Backoff.EXPONENTIAL, dg.Jitter.PLUS_MINUS)
    for attempt, (low, high) in ((1, (0, 20)), (2, (20, 40))):
        delays = [
            calculate_delay(attempt, policy.backoff, policy.jitter, policy.delay)
            for _ in range(200)
        ]
        assert low <= min(delays) and max(delays) <= high, (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > (high - low) / 2  # the jitter spreads them
    monkeypatch.setenv(RETRY_DELAY_VARIABLE, "3")
    assert transient_retries().delay == 3


def test_architecture_note_names_every_module_of_the_tree():
    """ARCHITECTURE.md's tree lists every module of the package, in its package, and nothing
    that is not there: it cannot drift from the code."""
    tree = (REPO / "ARCHITECTURE.md").read_text().split("```", 2)[1].splitlines()
    start = tree.index("coyo_platform/") + 1
    end = next(i for i in range(start, len(tree)) if not tree[i][:1].isspace())
    package = tree[start:end]  # the indented lines under "coyo_platform/"
    listed: dict[str, set[str]] = {}
    folder = ""
    for line in package:
        words = line.split()
        if words[0].endswith("/"):  # "  label/   __main__.py  settings.py ..."
            folder, words = words[0].rstrip("/"), words[1:]
        elif len(line) - len(line.lstrip()) <= 2:  # "  definitions.py ...": the package's top
            folder = ""
        listed.setdefault(folder, set()).update(words)
    actual: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            folder = "" if path.parent == PACKAGE else path.parent.name
            actual.setdefault(folder, set()).add(path.name)
    assert listed == actual
