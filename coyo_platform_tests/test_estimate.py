"""``coyo-platform estimate`` as a user runs it: published figures where nothing was measured,
each said to be one; the benchmarks' kept JSON (in the shape they write it) where it was, naming
the machine; clear errors; and README's cost table, which is its output."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from coyo_platform_tests.conftest import BIN, REPO

ROWS = 747_000_000
PARTS = 128
H100 = "AMD EPYC 9654 96-Core Processor, 26 cores; torch 2.9.0+cu128; NVIDIA H100 80GB HBM3"
XEON = "Intel(R) Xeon(R) Platinum 8488C, 2 cores"


def estimate(*flags: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "coyo-platform"), "estimate", *flags],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def ok(*flags: str, cwd: Path = REPO) -> str:
    done = estimate(*flags, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def table(out: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell (the step)."""
    rows = [ln.strip("|").split("|") for ln in out.splitlines() if ln.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def number(cell: str) -> float:
    """The first number in a cell (``$2,862``, ``715.5 GPU-hours``, ``180.1 h (7.5 days)``)."""
    return float(re.search(r"[\d,]+(\.\d+)?", cell).group().replace(",", ""))


def sources(out: str) -> dict[str, str]:
    """The sources list: its lines by what they are the source of."""
    block = out.split("Sources:")[1].split("Assumptions:")[0]
    items = [ln[2:] for ln in block.splitlines() if ln.startswith("- ")]
    return {item.split(": ", 1)[0]: item.split(": ", 1)[1] for item in items}


# ---- the benchmarks' JSON, as benchmarks/label.py and benchmarks/download.py write them -------


def label_figures(rate: float, device: str = "cuda:0", machine: str = H100, **changed) -> dict:
    """``benchmarks/label.py --json``'s figures (every key it writes), (b) at ``rate``."""
    figures = {
        "machine": machine,
        "device": device,
        "model": "tf_efficientnetv2_xl.in21k" if device != "cpu" else "tf_efficientnetv2_b0",
        "outputs": 21_843,
        "preset": "coyo" if device != "cpu" else "timm",
        "input": {
            "input_size": [3, 512, 512] if device != "cpu" else [3, 224, 224],
            "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "precision": "fp16" if device != "cpu" else "bf16",
        "batch_size": 256,
        "loader_processes": 15,
        "compiled": False,
        "decode_on_device": False,
        "images": 32_000,
        "shards": 16,
        "a_model_alone": rate * 1.05,
        "b_label_program": rate,
        "b_images_labeled": 32_000,
        "b_wall_seconds": 32_000 / rate + 20.0,
        "b_warmup_seconds": 20.0,
        "c_baseline": rate / 2,
        "b/a": 1 / 1.05,
        "b/c": 2.0,
        "peak_rss_mb_quarter": 3_000.0,
        "peak_rss_mb_all": 3_100.0,
        "peak_gpu_memory_mb": 40_000.0,
        "d_loader_cpu_ms_per_image_coyo_512": 2.3,
        "d_loader_cpu_ms_per_image_timm": 7.0,
        "d_phash_ms_per_image_no_longer_computed": 3.5,
    }
    if device.startswith("cuda"):
        figures["usd_per_gpu_hour"] = 2.5
        figures["usd_per_million_images"] = 1e6 / rate / 3600 * 2.5
        figures["gpu_hours_for_747m"] = 747e6 / rate / 3600
    return {**figures, **changed}


def _engine(name: str, rows: int, seconds: float, cpu_seconds: float) -> dict:
    """One engine's report in a download benchmark's JSON (``run_engine`` and what is added)."""
    return {
        "engine": name,
        "seconds": seconds,
        "rows": rows,
        "success": rows - 66,
        "timeouts": 66,
        "other_failures": 0,
        "other_reasons": {},
        "peak_rss_mb": 800.0,
        "cpu_seconds": cpu_seconds,
        "held_back": 0,
        "server_errors": {},
        "server": {"connections": 400, "tls_connections": 100, "requests": 3_000},
        "images_per_second": (rows - 66) / seconds,
    }


def download_figures(mode: str, rows: int, cpu_seconds: float, machine: str = XEON) -> dict:
    """``benchmarks/download.py [--web] --json``'s figures, ours spending ``cpu_seconds``."""
    engines = {
        "img2dataset": _engine("img2dataset", rows, 40.0, cpu_seconds * 0.8),
        "ours": _engine("ours", rows, 35.0, cpu_seconds),
    }
    common = {"machine": machine, "processes": 2, "threads": 16, "shard": 500}
    tail = {
        "ratio_images_per_second": 1.14,
        "target": 1.2 if mode.startswith("web") else 0.95,
        "target_met": False,
        "load_average_before": "0.10 0.20 0.30",
        "load_average_after": "1.50 0.90 0.50",
    }
    if mode.startswith("cpu"):
        return {"mode": mode, **common, "images": rows, "engines": engines, **tail}
    web = {
        "tls_rows": 700,
        "stalled_rows": 66,
        "engines": engines,
        "tls_successes": {"img2dataset": 680, "ours": 680},
        "stalled_timeouts": {"img2dataset": 66, "ours": 66},
        "same_successful_rows": True,
    }
    return {"mode": mode, **common, "rows": rows, **web, **tail}


def keep(folder: Path, name: str, figures: dict) -> Path:
    """A benchmark's JSON kept as it writes it (``json.dumps``, ``indent``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(figures, indent=1))
    return folder


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    return set()


def _strings(script: str) -> set[str]:
    tree = ast.parse((REPO / "benchmarks" / script).read_text())
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_the_json_here_has_the_keys_the_benchmarks_write():
    """The fixtures' keys, and every key the estimate reads, are names the benchmark scripts
    write: renaming one there fails here."""
    from coyo_platform import estimate as est

    label, download = _strings("label.py"), _strings("download.py")
    assert _keys(label_figures(100.0)) <= label
    assert {k for key in est.LABEL_KEYS for k in key.split(".")} <= label
    for mode in ("web", "cpu"):
        assert mode in download
        assert _keys(download_figures(mode, 3_000, 100.0)) <= download
    assert {k for key in est.DOWNLOAD_KEYS for k in key.split(".")} <= download


# ---- published figures ------------------------------------------------------------------------


def test_nothing_measured_gives_published_figures_each_said_to_be_one(tmp_path: Path):
    out = ok("--parts", "128", "--results", str(tmp_path))
    rows = table(out)
    labeling, downloading = rows["labeling"], rows["downloading"]
    assert labeling[0] == "290 img/s a GPU, published"
    assert number(labeling[1]) == pytest.approx(ROWS / 290 / 3600, abs=0.05)  # 715.5
    assert number(labeling[6]) == pytest.approx(ROWS / 290 / 3600 * 4.00, abs=0.5)  # $2,862
    assert number(labeling[5]) == pytest.approx(4.00 / 290 / 3600 * 1e6, abs=0.005)  # $3.83
    assert downloading[0] == "1,300 img/s a node, published"
    assert number(downloading[1]) == pytest.approx(ROWS / 1300 / 3600, abs=0.05)  # 159.6
    assert number(downloading[6]) == pytest.approx(ROWS / 1300 / 3600 * 0.71, abs=0.5)  # $113
    # 4 GPUs and 8 nodes by default: labeling is slower, 32 rounds, plus one partition's download
    per_part = ROWS / PARTS
    wall = 32 * per_part / 290 / 3600 + per_part / 1300 / 3600
    assert number(rows["whole run"][3]) == pytest.approx(wall, abs=0.05)
    assert number(rows["whole run"][6]) == pytest.approx(
        number(labeling[6]) + number(downloading[6]), abs=1
    )
    said = sources(out)
    assert said["labeling rate"].startswith("published: timm's 290 img/s")
    assert "RTX 5090" in said["labeling rate"] and "label-gpu.json" in said["labeling rate"]
    assert said["download rate"].startswith("published: img2dataset's 1,300 img/s on 16 cores")
    assert said["labeling target"].endswith("issue 18's target, not measured")
    assert "measured" not in " ".join(c for row in rows.values() for c in row)
    assert "(a target, not measured)" in out and "207.5 GPU-hours, $830" in out


def test_a_cpu_label_run_is_context_never_a_gpu_rate(tmp_path: Path):
    keep(tmp_path, "label-cpu.json", label_figures(64.2, device="cpu", machine=XEON))
    out = ok("--results", str(tmp_path))
    assert table(out)["labeling"][0] == "290 img/s a GPU, published"
    assert sources(out)["also kept"] == (
        f"{tmp_path / 'label-cpu.json'}: 64.2 img/s end to end with tf_efficientnetv2_b0 on "
        f"{XEON}, a CPU (not used for GPU-hours)"
    )


def test_published_download_rate_scales_with_cores(tmp_path: Path):
    rows = table(ok("--results", str(tmp_path), "--cores-per-node", "32"))
    assert rows["downloading"][0] == "2,600 img/s a node, published"


# ---- measured figures -------------------------------------------------------------------------


@pytest.fixture
def measured(tmp_path: Path) -> Path:
    """A results folder: (b) 500 img/s on an H100; the web's download, 25 rows a CPU-second."""
    keep(tmp_path, "label-gpu.json", label_figures(500.0))
    keep(tmp_path, "download-web.json", download_figures("web", 3_000, 120.0))
    return tmp_path


def test_measured_rates_are_used_and_their_machines_named(measured: Path):
    out = ok("--results", str(measured))
    rows, said = table(out), sources(out)
    assert rows["labeling"][0] == "500 img/s a GPU, measured"
    assert number(rows["labeling"][1]) == pytest.approx(ROWS / 500 / 3600, abs=0.05)  # 415.0
    assert said["labeling rate"] == (
        f"measured: {measured / 'label-gpu.json'}, (b) the label program end to end, "
        f"tf_efficientnetv2_xl.in21k, precision fp16, batch 256, on {H100}"
    )
    assert rows["downloading"][0] == "400 img/s a node, measured"  # 3,000 / 120 s x 16 cores
    assert number(rows["downloading"][1]) == pytest.approx(ROWS / 400 / 3600, abs=0.05)
    assert said["download rate"] == (
        f"measured: {measured / 'download-web.json'}: 40.0 ms of CPU a row, 25.0 rows per "
        f"CPU-second, on {XEON}, x 16 cores a node"
    )
    assert "published" not in said["labeling rate"] + said["download rate"]
    assert said["labeling target"].endswith("not measured")  # still a target, shown as one


def test_dollars_scale_with_the_price_and_hours_divide_by_the_gpus(measured: Path):
    folder = ("--results", str(measured))
    at_4 = table(ok(*folder, "--price-gpu", "4", "--gpus", "4"))
    at_8 = table(ok(*folder, "--price-gpu", "8", "--gpus", "8"))
    assert number(at_8["labeling"][6]) == pytest.approx(2 * number(at_4["labeling"][6]), abs=1)
    assert number(at_4["labeling"][6]) == pytest.approx(ROWS / 500 / 3600 * 4, abs=0.5)
    assert number(at_8["labeling"][1]) == number(at_4["labeling"][1])  # the same GPU-hours
    per_gpu = number(at_4["labeling"][1])
    assert number(at_4["labeling"][3]) == pytest.approx(per_gpu / 4, abs=0.06)
    assert number(at_8["labeling"][3]) == pytest.approx(per_gpu / 8, abs=0.06)
    assert at_4["downloading"] == at_8["downloading"]
    # the slower stage bounds the wall, plus one partition of the other: labeling at 4 GPUs,
    # downloading (16 rounds of 8 nodes) at 8
    label_part, download_part = ROWS / PARTS / 500 / 3600, ROWS / PARTS / 400 / 3600
    assert number(at_4["whole run"][3]) == pytest.approx(32 * label_part + download_part, abs=0.06)
    assert number(at_8["whole run"][3]) == pytest.approx(16 * download_part + label_part, abs=0.06)


def test_the_web_download_is_preferred_and_the_cpu_bound_one_shown(measured: Path):
    keep(measured, "download-cpu.json", download_figures("cpu", 2_000, 78.6))
    out = ok("--results", str(measured))
    assert table(out)["downloading"][0] == "400 img/s a node, measured"
    assert sources(out)["also kept"] == (
        f"{measured / 'download-cpu.json'}: 39.3 ms of CPU a row, 25.4 rows per CPU-second, on "
        f"{XEON} (not used: download-web.json is preferred)"
    )


def test_the_cpu_bound_download_alone_is_used(tmp_path: Path):
    keep(tmp_path, "download-cpu.json", download_figures("cpu", 2_000, 80.0))
    out = ok("--results", str(tmp_path), "--price-cpu", "1.42")
    downloading = table(out)["downloading"]
    assert downloading[0] == "400 img/s a node, measured"
    assert number(downloading[6]) == pytest.approx(ROWS / 400 / 3600 * 1.42, abs=0.5)
    assert "$1.42 a node-hour (`--price-cpu`)" in sources(out)["prices"]


# ---- errors -----------------------------------------------------------------------------------


def _error(folder: Path) -> str:
    done = estimate("--results", str(folder))
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_malformed_json_is_one_line_naming_the_file_and_its_command(measured: Path):
    (measured / "label-gpu.json").write_text('{"machine": "H100", "b_label_program": ')
    line = _error(measured)
    assert line.startswith(f"estimate: {measured / 'label-gpu.json'}: not readable JSON (")
    command = f"python benchmarks/label.py --gpu --json {measured / 'label-gpu.json'}"
    assert line.endswith(f"(written by `{command}`)")


@pytest.mark.parametrize(
    ("name", "figures", "problem"),
    [
        ("label-gpu.json", [1, 2], "holds a list, not the benchmark's object of figures"),
        (
            "label-gpu.json",
            {k: v for k, v in label_figures(500.0).items() if k != "b_label_program"},
            "no key 'b_label_program'",
        ),
        ("label-gpu.json", label_figures(500.0, b_label_program="fast"), "'b_label_program' is"),
        (
            "label-gpu.json",
            label_figures(500.0, b_label_program=0.0),
            "'b_label_program' is 0.0, not a positive number",
        ),
        ("label-gpu.json", label_figures(50.0, device="cpu"), "'device' is 'cpu', not a GPU"),
        (
            "label-gpu.json",
            label_figures(900.0, model="tf_efficientnetv2_b0"),
            "'model' is 'tf_efficientnetv2_b0', not the card's",
        ),
        (
            "label-gpu.json",
            label_figures(900.0, input={"input_size": [3, 384, 384]}),
            "'input.input_size' is [3, 384, 384], not the card's 512 px",
        ),
        (
            "download-web.json",
            {**download_figures("web", 3_000, 120.0), "engines": {"ours": {"rows": 3_000}}},
            "no key 'engines.ours.cpu_seconds'",
        ),
        (
            "download-web.json",
            download_figures("web-quick", 150, 20.0),
            "'mode' is 'web-quick', not 'web' (--quick is the tests' tiny run)",
        ),
        ("download-cpu.json", download_figures("web", 3_000, 120.0), "'mode' is 'web', not 'cpu'"),
    ],
)
def test_a_json_it_cannot_use_names_the_file_the_key_and_the_command(
    tmp_path: Path, name: str, figures: object, problem: str
):
    keep(tmp_path, name, figures)  # type: ignore[arg-type]
    line = _error(tmp_path)
    assert line.startswith(f"estimate: {tmp_path / name}: {problem}")
    writer = {
        "label-gpu.json": "python benchmarks/label.py --gpu",
        "download-web.json": "python benchmarks/download.py --web",
        "download-cpu.json": "python benchmarks/download.py",
    }[name]
    assert line.endswith(f"(written by `{writer} --json {tmp_path / name}`)")


def test_a_results_folder_named_but_missing_is_an_error(tmp_path: Path):
    done = estimate("--results", str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"estimate: --results {tmp_path / 'nowhere'}: no such folder"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--parts", "0"], "argument --parts: must be above 0, got 0"),
        (["--parts", "many"], "argument --parts: 'many' is not a whole number"),
        (["--gpus", "0"], "argument --gpus: must be above 0, got 0"),
        (["--download-nodes", "-2"], "argument --download-nodes: must be above 0, got -2"),
        (["--price-gpu", "-1"], "argument --price-gpu: must be 0 or more, got -1"),
        (["--price-cpu", "nan"], "argument --price-cpu: must be 0 or more, got nan"),
        (["--rows-per-part", "0"], "argument --rows-per-part: must be above 0, got 0"),
    ],
)
def test_bad_flags_are_argparse_errors(tmp_path: Path, flags: list[str], message: str):
    done = estimate(*flags, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_default_results_folder_is_benchmarks_results_where_it_runs(tmp_path: Path):
    keep(tmp_path / "benchmarks" / "results", "label-gpu.json", label_figures(500.0))
    out = ok(cwd=tmp_path)
    assert table(out)["labeling"][0] == "500 img/s a GPU, measured"
    assert "measured: benchmarks/results/label-gpu.json" in sources(out)["labeling rate"]


def test_the_module_imports_no_dagster():
    code = (
        "import sys, coyo_platform.estimate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'torch')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ---- README -----------------------------------------------------------------------------------


def test_readme_cost_table_is_the_estimate_for_the_kept_results():
    """README's "What a full run costs" is the command named in its marker, run on the kept
    ``benchmarks/results/`` (none yet: the published figures), verbatim."""
    readme = (REPO / "README.md").read_text()
    found = re.search(
        r"<!-- estimate: (coyo-platform estimate[^>]*) -->\n(.*?)<!-- /estimate -->", readme, re.S
    )
    assert found, "README has no <!-- estimate: ... --> ... <!-- /estimate --> block"
    command = shlex.split(found.group(1))
    assert command[:2] == ["coyo-platform", "estimate"]
    assert found.group(2) == ok(*command[2:]), (
        f"README's cost table is out of date: run `{found.group(1)}` and paste its output"
    )
