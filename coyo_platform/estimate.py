"""What a full run costs and how long it takes: GPU-hours, download node-hours, dollars and wall
time, from the benchmarks' measured rates where they were kept, published figures where not.

    coyo-platform estimate [--parts 128] [--gpus N] [--download-nodes M] [--price-gpu USD]
                           [--price-cpu USD] [--cores-per-node C] [--rows-per-part R]
                           [--results DIR]

The results folder (``--results``; default ``benchmarks/results/`` under the folder it runs in,
where a missing folder means nothing was measured) holds the JSON the benchmarks write with
``--json``, under these names:

  label-gpu.json     ``python benchmarks/label.py --gpu --json benchmarks/results/label-gpu.json``:
                     the labeling rate, (b) the label program end to end on one GPU, with the
                     card's model (tf_efficientnetv2_xl) at 512 px
  label-cpu.json     ``python benchmarks/label.py --json benchmarks/results/label-cpu.json``:
                     shown as context only; a CPU's rate is never used for GPU-hours
  download-web.json  ``python benchmarks/download.py --web --json ...download-web.json``: the
                     download rate (preferred: the realistic web's image sizes and TLS)
  download-cpu.json  ``python benchmarks/download.py --json ...download-cpu.json``: the download
                     rate where there is no download-web.json

Each kept file names the machine it was measured on, and the output names it too. A rate with no
file is a published figure, and the output says so (``PUBLISHED_*`` below); issue 18's 1,000
img/s on an H100 is a target and is printed as one, never used as a rate. ``stats.py`` and
``scale.py``'s JSON are not read: label stats, sampling and the sensors run on the Dagster
service's tasks, which the estimate leaves out with storage and transfer (the output's "Not
counted"). The arithmetic's assumptions are in ``ASSUMPTIONS``, printed with every estimate.

No ``dagster`` here: the CLI's ``estimate`` calls ``estimate`` and prints ``render``'s markdown,
which README's cost table is, verbatim.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coyo_platform.label.settings import DEFAULT_MODEL

#: COYO-700M, as its card counts it: 747M rows in 128 parts.
CARD_ROWS = 747_000_000
CARD_PARTS = 128
ROWS_PER_PART = CARD_ROWS / CARD_PARTS
#: The stack's capacity by default (infra/coyo-platform.yaml: GpuMaxInstances, one GPU each, and
#: CpuMaxInstances), so the wall time is the deployed one's.
GPUS = 4
DOWNLOAD_NODES = 8
#: Assumed on-demand prices, us-east-1 (check current pricing): an H100 per GPU-hour, and a
#: c7i.4xlarge (16 vCPU) per hour.
PRICE_GPU = 4.00
PRICE_CPU = 0.71
CORES_PER_NODE = 16
DEFAULT_RESULTS = Path("benchmarks") / "results"

#: Published figures, used only where nothing was measured.
PUBLISHED_GPU = 290.0
PUBLISHED_GPU_TEXT = (
    "timm's 290 img/s for tf_efficientnetv2_xl at 512 px on an RTX 5090 with AMP "
    "(an RTX 5090's rate, while the default price is an H100's)"
)
PUBLISHED_DOWNLOAD, PUBLISHED_DOWNLOAD_CORES = 1300.0, 16
PUBLISHED_DOWNLOAD_TEXT = "img2dataset's 1,300 img/s on 16 cores"
#: Issue 18's target for one H100: a target, not a measurement.
TARGET_GPU = 1000.0

ASSUMPTIONS = (
    "Every row is downloaded and labeled: an upper bound, since rows whose download fails are "
    "not labeled.",
    "Hours are busy hours, as billed when capacity follows the work (the stack's ECS capacity "
    "providers scale in); a machine kept up while it waits costs more.",
    "A GPU labels one partition at a time (one label task per GPU) and a download node downloads "
    "one (a download task takes 15 of a c7i.4xlarge's 16 vCPU); a stage alone takes "
    "ceil(parts / machines) rounds of one partition's hours.",
    "A download node's rate is its cores (`--cores-per-node`) times a rate per core: measured, "
    "the rows per CPU-second of the download program's processes (user and system time, start-up "
    "included), i.e. a node that is CPU-bound because enough threads hide the web's latency "
    "(a real crawl's DNS, latency and bandwidth can hold it lower); published, img2dataset's "
    "figure divided by its 16 cores.",
    "Wall time: the two stages overlap (the sensor labels a partition's shards as they finish), "
    "so the slower stage bounds it, plus one partition of the faster stage (the first download "
    "before any labeling, or the last labeling after the last download): an upper bound, since "
    "labeling starts before a partition's download ends.",
)
NOT_COUNTED = (
    "S3 storage and requests, the NAT gateway and data transfer (every downloaded image passes "
    "the NAT gateway, charged per GB), the Dagster service and its database, label stats and "
    "sampling (on the Dagster service's tasks), spot discounts."
)


class EstimateError(ValueError):
    """A kept benchmark JSON the estimate cannot use: the message names the file, what is wrong
    (the key, where one is missing or wrong) and the command that writes it."""


@dataclass(frozen=True)
class Kept:
    """One kept benchmark JSON: its file name, the benchmark command that writes it."""

    name: str
    writer: str

    def command(self, folder: Path) -> str:
        return f"{self.writer} --json {folder / self.name}"


LABEL_GPU = Kept("label-gpu.json", "python benchmarks/label.py --gpu")
LABEL_CPU = Kept("label-cpu.json", "python benchmarks/label.py")
DOWNLOAD_WEB = Kept("download-web.json", "python benchmarks/download.py --web")
DOWNLOAD_CPU = Kept("download-cpu.json", "python benchmarks/download.py")
#: The download JSONs in the order they are preferred, with the ``mode`` each must hold.
DOWNLOADS = ((DOWNLOAD_WEB, "web"), (DOWNLOAD_CPU, "cpu"))
#: The keys the estimate reads from each kept JSON (a test checks the benchmarks write them).
LABEL_KEYS = ("machine", "device", "model", "input.input_size", "b_label_program")
DOWNLOAD_KEYS = ("mode", "machine", "engines.ours.rows", "engines.ours.cpu_seconds")


@dataclass(frozen=True)
class Figures:
    """A kept benchmark JSON, read: its values by dotted key, each checked, every error naming
    the file, the key and the command that writes the file."""

    path: Path
    kept: Kept
    data: dict[str, Any]

    def fail(self, problem: str) -> EstimateError:
        return EstimateError(
            f"{self.path}: {problem} (written by `{self.kept.command(self.path.parent)}`)"
        )

    def get(self, key: str) -> Any:
        value: Any = self.data
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise self.fail(f"no key {key!r}")
            value = value[part]
        return value

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key!r} is {value!r}, not a text")
        return value

    def number(self, key: str) -> float:
        value = self.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value <= 0:
            raise self.fail(f"{key!r} is {value!r}, not a positive number")
        return float(value)


def read_kept(folder: Path, kept: Kept) -> Figures | None:
    """``kept``'s JSON in ``folder``, or None where the benchmark's figures were not kept."""
    path = folder / kept.name
    if not path.exists():
        return None
    empty = Figures(path, kept, {})
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise empty.fail(f"not readable JSON ({' '.join(str(err).split())})") from err
    if not isinstance(data, dict):
        raise empty.fail(f"holds a {type(data).__name__}, not the benchmark's object of figures")
    return Figures(path, kept, data)


@dataclass(frozen=True)
class Rate:
    """Images a second on one machine (a GPU, a download node), and where the figure came from:
    ``kind`` is "measured" or "published", ``source`` the sources list's line."""

    per_second: float
    kind: str
    source: str


def gpu_rate(folder: Path) -> Rate:
    """The labeling rate of one GPU: label-gpu.json's end-to-end (b), else the published one."""
    figures = read_kept(folder, LABEL_GPU)
    if figures is None:
        return Rate(
            PUBLISHED_GPU,
            "published",
            f"published: {PUBLISHED_GPU_TEXT}; no {folder / 'label-gpu.json'}",
        )
    device, model = figures.text("device"), figures.text("model")
    if not device.startswith("cuda"):
        raise figures.fail(f"'device' is {device!r}, not a GPU (a CPU's run is label-cpu.json)")
    if model.split(".")[0] != DEFAULT_MODEL.split(".")[0]:
        raise figures.fail(f"'model' is {model!r}, not the card's {DEFAULT_MODEL}")
    size = figures.get("input.input_size")
    if not isinstance(size, list) or not size or size[-1] != 512:
        raise figures.fail(f"'input.input_size' is {size!r}, not the card's 512 px")
    rate = figures.number("b_label_program")
    details = ", ".join(
        f"{name} {figures.data[key]}"
        for key, name in (("precision", "precision"), ("batch_size", "batch"))
        if key in figures.data
    )
    return Rate(
        rate,
        "measured",
        f"measured: {figures.path}, (b) the label program end to end, {model}"
        f"{', ' + details if details else ''}, on {figures.text('machine')}",
    )


def cpu_label_context(folder: Path) -> str | None:
    """label-cpu.json's rate, as context: a CPU's figure, never a GPU's."""
    figures = read_kept(folder, LABEL_CPU)
    if figures is None:
        return None
    return (
        f"{figures.path}: {figures.number('b_label_program'):,.1f} img/s end to end with "
        f"{figures.text('model')} on {figures.text('machine')}, a CPU (not used for GPU-hours)"
    )


def _per_core(figures: Figures, mode: str) -> float:
    """Rows per CPU-second of the download program's processes in a download benchmark's JSON."""
    found = figures.text("mode")
    if found != mode:
        quick = " (--quick is the tests' tiny run)" if found.endswith("-quick") else ""
        raise figures.fail(f"'mode' is {found!r}, not {mode!r}{quick}")
    return figures.number("engines.ours.rows") / figures.number("engines.ours.cpu_seconds")


def download_rate(folder: Path, cores: int) -> tuple[Rate, list[str]]:
    """The rate of one download node of ``cores`` cores, from the first download JSON kept (web,
    then CPU-bound), else the published one; and a context line for each other one kept."""
    rate: Rate | None = None
    used: Path | None = None
    context: list[str] = []
    for kept, mode in DOWNLOADS:
        figures = read_kept(folder, kept)
        if figures is None:
            continue
        per_core = _per_core(figures, mode)
        seen = (
            f"{figures.path}: {1000 / per_core:,.1f} ms of CPU a row, {per_core:,.1f} rows per "
            f"CPU-second, on {figures.text('machine')}"
        )
        if used is not None:
            context.append(f"{seen} (not used: {used.name} is preferred)")
            continue
        used = figures.path
        rate = Rate(per_core * cores, "measured", f"measured: {seen}, x {cores} cores a node")
    if rate is None:
        per_core = PUBLISHED_DOWNLOAD / PUBLISHED_DOWNLOAD_CORES
        names = " or ".join(str(folder / kept.name) for kept, _ in DOWNLOADS)
        rate = Rate(
            per_core * cores,
            "published",
            f"published: {PUBLISHED_DOWNLOAD_TEXT}, {per_core:,.2f} a core, x {cores} cores a "
            f"node; no {names}",
        )
    return rate, context


@dataclass(frozen=True)
class Stage:
    """One stage of the run over every partition: ``machines`` of one ``unit`` at ``rate``."""

    name: str
    unit: str
    rate: Rate
    machines: int
    price: float
    parts: int
    rows_per_part: float

    @property
    def partition_hours(self) -> float:
        return self.rows_per_part / self.rate.per_second / 3600

    @property
    def busy_hours(self) -> float:
        return self.parts * self.partition_hours

    @property
    def elapsed_hours(self) -> float:
        """The stage alone: its rounds of one partition per machine."""
        return math.ceil(self.parts / self.machines) * self.partition_hours

    @property
    def cost(self) -> float:
        return self.busy_hours * self.price

    @property
    def per_million(self) -> float:
        return self.price / (self.rate.per_second * 3600) * 1e6


@dataclass(frozen=True)
class Estimate:
    """A full run's figures: its two stages, its wall time, and the lines that say where each
    rate came from."""

    parts: int
    rows_per_part: float
    cores_per_node: int
    labeling: Stage
    downloading: Stage
    prices: str
    context: tuple[str, ...]

    @property
    def rows(self) -> float:
        return self.parts * self.rows_per_part

    @property
    def wall_hours(self) -> float:
        """The slower stage alone, plus one partition of the faster one."""
        slow, fast = sorted((self.labeling, self.downloading), key=lambda s: -s.elapsed_hours)
        return slow.elapsed_hours + fast.partition_hours

    @property
    def cost(self) -> float:
        return self.labeling.cost + self.downloading.cost


def _price_text(price_gpu: float | None, price_cpu: float | None) -> str:
    gpu = (
        f"${PRICE_GPU:.2f} a GPU-hour (the default: one H100 on demand, assumed)"
        if price_gpu is None
        else f"${price_gpu:,.2f} a GPU-hour (`--price-gpu`)"
    )
    cpu = (
        f"${PRICE_CPU:.2f} a node-hour (the default: a c7i.4xlarge, 16 vCPU, on demand, assumed)"
        if price_cpu is None
        else f"${price_cpu:,.2f} a node-hour (`--price-cpu`)"
    )
    return f"{gpu}; {cpu}; us-east-1, check current pricing"


def estimate(
    parts: int = CARD_PARTS,
    *,
    gpus: int = GPUS,
    download_nodes: int = DOWNLOAD_NODES,
    price_gpu: float | None = None,
    price_cpu: float | None = None,
    cores_per_node: int = CORES_PER_NODE,
    rows_per_part: float = ROWS_PER_PART,
    results: Path = DEFAULT_RESULTS,
) -> Estimate:
    """A full run's estimate for ``parts`` partitions from the JSONs kept in ``results`` (a
    missing folder: nothing measured). Prices left None are the defaults, and say so."""
    label, (download, context) = gpu_rate(results), download_rate(results, cores_per_node)
    cpu_context = cpu_label_context(results)
    sized = {"parts": parts, "rows_per_part": rows_per_part}
    labeling = Stage("labeling", "GPU", label, gpus, _or(price_gpu, PRICE_GPU), **sized)
    downloading = Stage(
        "downloading", "node", download, download_nodes, _or(price_cpu, PRICE_CPU), **sized
    )
    return Estimate(
        parts,
        rows_per_part,
        cores_per_node,
        labeling,
        downloading,
        _price_text(price_gpu, price_cpu),
        tuple(([cpu_context] if cpu_context else []) + context),
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _hours(hours: float) -> str:
    return f"{hours:,.1f} h" + (f" ({hours / 24:,.1f} days)" if hours >= 48 else "")


def _rate(rate: Rate, unit: str) -> str:
    figure = f"{rate.per_second:,.0f}" if rate.per_second >= 100 else f"{rate.per_second:,.1f}"
    return f"{figure} img/s a {unit}, {rate.kind}"


def _row(stage: Stage) -> str:
    plural = "s" if stage.machines != 1 else ""
    cells = (
        stage.name,
        _rate(stage.rate, stage.unit),
        f"{stage.busy_hours:,.1f} {stage.unit}-hours",
        f"{stage.machines} {stage.unit}{plural}",
        _hours(stage.elapsed_hours),
        f"${stage.price:,.2f} a {stage.unit}-hour",
        f"${stage.per_million:,.2f}",
        f"${stage.cost:,.0f}",
    )
    return "| " + " | ".join(cells) + " |"


def _wall_text(e: Estimate) -> str:
    slow, fast = sorted((e.labeling, e.downloading), key=lambda s: -s.elapsed_hours)
    rounds = math.ceil(e.parts / slow.machines)
    first = "first partition's download" if fast is e.downloading else "last partition's labeling"
    return (
        f"Wall time {_hours(e.wall_hours)}: {slow.name} is the slower stage, {rounds} "
        f"round{'s' if rounds != 1 else ''} of "
        f"{slow.partition_hours:,.2f} h a partition on {slow.machines} {slow.unit}"
        f"{'s' if slow.machines != 1 else ''}, plus the {first} ({fast.partition_hours:,.2f} h)."
    )


def _target_text(e: Estimate) -> str:
    hours = e.rows / TARGET_GPU / 3600
    return (
        f"At issue 18's target of {TARGET_GPU:,.0f} img/s on one H100 (a target, not measured), "
        f"labeling would take {hours:,.1f} GPU-hours, ${hours * e.labeling.price:,.0f}."
    )


def render(e: Estimate) -> str:
    """The estimate as markdown: a table, the wall time, the target, the sources and the
    assumptions; README's cost table is this text."""
    lines = [
        f"{e.parts} parts x {e.rows_per_part:,.0f} rows = {e.rows:,.0f} rows, on "
        f"{e.labeling.machines} GPU{'s' if e.labeling.machines != 1 else ''} and "
        f"{e.downloading.machines} download node{'s' if e.downloading.machines != 1 else ''} "
        f"of {e.cores_per_node} cores:",
        "",
        "| step | rate | busy | machines | the stage alone | price | per million images | cost |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        _row(e.labeling),
        _row(e.downloading),
        f"| whole run | | | | {_hours(e.wall_hours)} wall | | "
        f"${e.labeling.per_million + e.downloading.per_million:,.2f} | ${e.cost:,.0f} |",
        "",
        _wall_text(e),
        "",
        _target_text(e),
        "",
        "Sources:",
        "",
        f"- labeling rate: {e.labeling.rate.source}",
        f"- download rate: {e.downloading.rate.source}",
        f"- labeling target: {TARGET_GPU:,.0f} img/s on one H100, issue 18's target, not measured",
        *(f"- also kept: {line}" for line in e.context),
        f"- prices: {e.prices}",
        "",
        "Assumptions:",
        "",
        *(f"- {line}" for line in ASSUMPTIONS),
        "",
        f"Not counted: {NOT_COUNTED}",
    ]
    return "\n".join(lines) + "\n"
