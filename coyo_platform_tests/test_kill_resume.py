"""A run killed at any point, then rerun, writes exactly what an uninterrupted run writes.

Real processes are SIGKILLed, their whole process group with them (the download program's pool
processes, the label program's loader processes, the Pipes programs the CLI starts), at known
points:

- found from outside: a loopback image server whose *gate* URL holds its answer until the test
  opens it (the download is then inside that URL's shard), or files appearing;
- or from inside, for points too brief to hit from outside: a ``sitecustomize`` put on the
  program's ``PYTHONPATH`` SIGKILLs the group just before the n-th ``os.replace`` onto a given
  name, i.e. between a shard's moves into place, or after a file was written under its temporary
  name but before it was renamed.

Each rerun must give what an uninterrupted run gives: every id once, the same statuses, images,
labels and probabilities, and nothing partial visible (``_tmp/``, ``*.tmp-*``, a shard's files
under their names without its ``_stats.json``, unless they are whole and the rerun redoes them).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from coyo_platform import demo
from coyo_platform_tests.conftest import (
    LOOPBACK,
    CliRun,
    download_cmd,
    label_cmd,
    label_folder,
    write_tar,
)

ROWS, SHARD = 30, 10  # 3 shards
SHARDS = [f"{i:05d}" for i in range(ROWS // SHARD)]
GATE_ROW = 13  # in the 2nd shard
FIRST_ID = demo.FIRST_ID + 5_000_000


# ---------------------------------------------------------------- processes


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """``cmd`` in a new session (its own process group), output to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )


def kill_group(proc: subprocess.Popen, send: bool = True) -> None:
    """SIGKILL ``proc`` and everything in its process group (unless ``send`` is false: it was
    done already); return once none of them runs any more."""
    if send:
        with contextlib.suppress(ProcessLookupError):  # it ended by itself: asserted by callers
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while running_in_group(proc.pid):  # pool / loader processes: dead within moments
        time.sleep(0.01)


def running_in_group(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is not yet dead (zombies count as dead: a container
    whose PID 1 does not reap orphans keeps them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, group = text[text.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state not in ("Z", "X"):
            return True
    return False


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, what: str) -> None:
    """Poll until ``ready()``; fail if the process ends first."""
    while not ready():
        check_alive(proc, log, what)
        time.sleep(0.002)


def check_alive(proc: subprocess.Popen, log: Path, what: str) -> None:
    if proc.poll() is not None:
        pytest.fail(f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")


KILL_HOOK = """
import os, re, signal

_spec = os.environ.get("COYO_TEST_KILL_BEFORE_REPLACE")
if _spec and os.getpgrp() != int(os.environ["COYO_TEST_SPARE_GROUP"]):
    _pattern, _, _n = _spec.rpartition("#")
    _pattern, _n, _seen, _replace = re.compile(_pattern), int(_n), [0], os.replace

    def _replace_or_die(src, dst, *args, **kwargs):
        if _pattern.search(os.fspath(dst)):
            _seen[0] += 1
            if _seen[0] == _n:
                os.killpg(os.getpgrp(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die
"""


def killed_before_replace(tmp_path: Path, pattern: str, n: int = 1) -> dict[str, str]:
    """Environment for a program whose process group is SIGKILLed just before its ``n``-th
    ``os.replace`` onto a path matching ``pattern`` (in whichever of its processes does it)."""
    hook = tmp_path / "kill_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PYTHONPATH": path,
        "COYO_TEST_KILL_BEFORE_REPLACE": f"{pattern}#{n}",
        "COYO_TEST_SPARE_GROUP": str(os.getpgrp()),  # never this test's own group
    }


def killed(proc: subprocess.Popen, log: Path) -> None:
    """``proc`` was SIGKILLed (by the hook); wait until its whole group is gone."""
    assert proc.wait() == -signal.SIGKILL, log.read_text()[-4000:]
    kill_group(proc, send=False)


def finish(cmd: list[str], log: Path, env: dict | None = None) -> None:
    proc = start(cmd, log, env)
    assert proc.wait() == 0, log.read_text()[-4000:]


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name)


# ---------------------------------------------------------------- an image server with a gate


class Gate:
    """URLs under ``/gate/`` answer only once the gate is open; counts the requests."""

    def __init__(self) -> None:
        self.hits = 0
        self._cond = threading.Condition()
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def pass_through(self) -> None:  # the server's side
        with self._cond:
            self.hits += 1
            self._cond.notify_all()
        self._open.wait()

    def hit(self) -> Callable[[], bool]:
        """A test that becomes true at the next request."""
        seen = self.hits
        return lambda: self.hits > seen


def gated_server(folder: Path, gate: Gate) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            if self.path.startswith("/gate/"):
                gate.pass_through()
                self.path = self.path.removeprefix("/gate")
            try:
                super().do_GET()
            except OSError:  # the client was killed while we waited
                pass

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:  # noqa: ANN001
            pass  # a killed client's broken pipe

    return Server(("127.0.0.1", 0), Handler)


class Web:
    def __init__(self, part: Path, gate: Gate, ids: list[int]) -> None:
        self.part, self.gate, self.ids = part, gate, ids


@pytest.fixture(scope="module")
def web(site, tmp_path_factory) -> Iterator[Web]:
    """A part of 3 shards whose row ``GATE_ROW`` goes through the gate (served, once open, the
    same file as without it), on a server of the demo photos."""
    gate = Gate()
    server = gated_server(site.images, gate)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    frame = demo.make_part(site.images, site.items, base, ROWS, FIRST_ID)
    urls = frame["url"].to_list()
    urls[GATE_ROW] = urls[GATE_ROW].replace(base, base + "/gate")
    frame = frame.with_columns(pl.Series("url", urls))
    part = tmp_path_factory.mktemp("web") / "part-00000.parquet"
    frame.write_parquet(part)
    try:
        yield Web(part, gate, frame["id"].to_list())
    finally:
        gate.open()
        server.shutdown()
        server.server_close()


def web_download_cmd(web: Web, out: Path) -> list[str]:
    return download_cmd(
        web.part, out, "--thread-count", "4", "--number-sample-per-shard", str(SHARD),
        "--image-size", "128", "--allow-networks", LOOPBACK, "--timeout", "5", "--retries", "0",
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(web: Web, tmp_path_factory) -> Path:
    """The uninterrupted download of the part."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    web.gate.open()
    finish(web_download_cmd(web, out), out.parent / "log")
    return out


# ---------------------------------------------------------------- what a shard folder holds


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def shard_rows(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).sort("key")


def check_visible(out: Path, undone_allowed: bool = False) -> list[str]:
    """What a reader may see in a shard folder after a run was killed: whole shards, each with
    its ``_stats.json`` (the "done" mark), and the staging folder ``_tmp``. With
    ``undone_allowed`` (a kill between a shard's moves into place), also that shard's tar and
    parquet without their ``_stats.json``: whole files, which readers skip and the rerun redoes.
    Returns the done shards."""
    done = sorted(p.name.removesuffix("_stats.json") for p in out.glob("*_stats.json"))
    names = {p.name for p in out.iterdir()}
    whole = {f"{s}{ext}" for s in done for ext in (".tar", ".parquet", "_stats.json")}
    assert whole <= names, f"a done shard lacks files: {sorted(whole - names)}"
    records = {"_fingerprint.json", "_crawl_dedup.json", "_crawl_dedup"}  # written whole first
    undone = names - whole - records - {"_tmp"}
    for name in undone if undone_allowed else ():
        assert name.endswith((".tar", ".parquet")), name
        if name.endswith(".tar"):
            assert tar_members(out / name)  # a whole tar
        else:
            assert pl.read_parquet(out / name).height == SHARD
    assert undone_allowed or not undone, f"partial shard files visible: {sorted(undone)}"
    for s in done:
        stats = json.loads((out / f"{s}_stats.json").read_text())
        rows = pl.read_parquet(out / f"{s}.parquet")
        assert rows.height == stats["count"] == SHARD
        members = tar_members(out / f"{s}.tar")
        assert sum(n.endswith(".jpg") for n in members) == stats["successes"]
    assert not temp_files(out)
    return done


def assert_same_as(out: Path, reference: Path, ids: list[int]) -> None:
    """``out`` holds exactly what the uninterrupted run wrote: the same files, the same rows
    (every id once), statuses, images and per-image json and caption."""
    assert not (out / "_tmp").exists(), "a killed run's staging folder was left behind"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not temp_files(out)
    every = pl.concat([pl.read_parquet(out / f"{s}.parquet") for s in SHARDS])
    assert sorted(every["id"].to_list()) == sorted(ids)  # none lost, none twice
    for s in SHARDS:
        got, want = shard_rows(out / f"{s}.parquet"), shard_rows(reference / f"{s}.parquet")
        assert got.select("id", "key", "status").rows() == want.select("id", "key", "status").rows()
        assert got.equals(want), s
        assert tar_members(out / f"{s}.tar") == tar_members(reference / f"{s}.tar"), s
        ok = int((got["status"] == "success").sum())
        assert ok == json.loads((out / f"{s}_stats.json").read_text())["successes"]


def download_report(log: Path) -> dict:
    """The download program's last JSON report in ``log`` (run from a shell, it prints it)."""
    text = log.read_text()
    return json.loads(text[text.rindex("\n{") + 1 :])


# ---------------------------------------------------------------- the download program

#: The 2nd shard's three moves into place; the kill comes before the last of them, whichever it is.
SHARD_1_COMMIT = r"/00001(\.tar|\.parquet|_stats\.json)$"


@pytest.mark.parametrize(
    "point", ["between shards", "inside a shard's commit", "after the last shard"]
)
def test_download_killed_then_rerun_equals_an_uninterrupted_run(
    web: Web, reference: Path, tmp_path: Path, point: str
):
    out, log = tmp_path / "shards", tmp_path / "log"
    cmd = web_download_cmd(web, out)
    web.gate.open()
    if point == "between shards":
        proc = start(cmd, log)
        wait_for(proc, lambda: (out / "00000_stats.json").exists(), log, "the 1st shard")
        kill_group(proc)
    elif point == "inside a shard's commit":  # its tar and parquet in place, not its stats
        proc = start(cmd, log, killed_before_replace(tmp_path, SHARD_1_COMMIT, n=3))
        killed(proc, log)
    else:  # every shard done, the process still summarizing
        proc = start(cmd, log)
        wait_for(proc, lambda: (out / f"{SHARDS[-1]}_stats.json").exists(), log, "the last one")
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    done = check_visible(out, undone_allowed=point == "inside a shard's commit")
    print(f"killed {point}: {sorted(p.name for p in out.iterdir())}")
    if point == "inside a shard's commit":
        assert done == ["00000"]
        assert {"00001.tar", "00001.parquet"} <= {p.name for p in out.iterdir()}
    elif point == "after the last shard":
        assert done == SHARDS
    kept = {s: (out / f"{s}.tar").stat().st_mtime_ns for s in done}

    finish(cmd, log)
    assert download_report(log)["shards_this_run"] == len(SHARDS) - len(done)
    assert {s: (out / f"{s}.tar").stat().st_mtime_ns for s in done} == kept  # not redone
    assert_same_as(out, reference, web.ids)


def test_download_killed_twice_mid_shard_then_finished(web: Web, reference: Path, tmp_path: Path):
    """Killed while the 2nd shard waits on a URL (the 1st committed, the 3rd maybe too: shards
    are fetched one after the other's rows are under way), rerun and killed there again, then
    finished: the shards committed are kept, the one killed is redone whole."""
    out, log = tmp_path / "shards", tmp_path / "log"
    cmd = web_download_cmd(web, out)
    web.gate.close()
    shard_0 = out / "00000_stats.json"
    for attempt in range(2):
        hit = web.gate.hit()
        proc = start(cmd, log)
        ready = lambda hit=hit: hit() and shard_0.exists()  # noqa: E731
        wait_for(proc, ready, log, "the gate and the 1st shard")
        kill_group(proc)
        done = check_visible(out)
        assert "00000" in done and "00001" not in done  # shard 1 only in _tmp
        staging = [p.name for p in (out / "_tmp").iterdir()]
        assert len([n for n in staging if n.startswith("shard-1-")]) == 1  # the earlier: gone
        if attempt == 0:
            kept = (out / "00000.tar").stat().st_mtime_ns
    web.gate.open()
    finish(cmd, log)
    assert download_report(log)["shards_this_run"] == len(SHARDS) - len(done)
    assert (out / "00000.tar").stat().st_mtime_ns == kept
    assert_same_as(out, reference, web.ids)


# ---------------------------------------------------------------- the label program

LABEL_SHARDS, PER_SHARD = 8, 5


@pytest.fixture(scope="module")
def tars(site, tmp_path_factory) -> Path:
    """Downloaded shards as the label program finds them: tars with their ``_stats.json``."""
    folder = tmp_path_factory.mktemp("tars")
    names = sorted(i.name for i in site.items if i.kind == "photo" and i.name.endswith(".jpg"))
    photos = [(site.images / name).read_bytes() for name in names]
    for s in range(LABEL_SHARDS):
        samples = [
            (f"{s:05d}{i:04d}", photos[(s * PER_SHARD + i) % len(photos)], {"id": s * 100 + i})
            for i in range(PER_SHARD)
        ]
        write_tar(folder / f"{s:05d}.tar", samples)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD}))
    return folder


def default_cmd(site, shards: Path, out: Path) -> list[str]:
    """The label program with its defaults (precision ``auto``, measured once per machine and
    model; the CPU batch size), one loader process."""
    return label_cmd(shards, out, site.checkpoint, "--num-workers", "1")


def test_label_program_killed_mid_write_twice_then_rerun_equals_an_uninterrupted_run(
    site, tars: Path, tmp_path: Path
):
    """Killed while the 3rd shard's parquet is being written (whole under its temporary name, not
    yet renamed), rerun and killed the same way on the 6th, then finished: byte-identical files to
    an uninterrupted run, in the default precision (batches never span shards, so a resumed run
    batches every shard as the uninterrupted one does)."""
    reference, root, log = tmp_path / "reference", tmp_path / "labels", tmp_path / "log"
    finish(default_cmd(site, tars, reference), log)
    want = label_folder(reference)
    out = root / want.relative_to(reference)  # the same labeler, the same part
    cmd = default_cmd(site, tars, root)
    for shard in ("00002", "00005", None):
        written = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
        if shard is None:
            finish(cmd, log)
        else:
            proc = start(cmd, log, killed_before_replace(tmp_path, rf"/{shard}\.parquet$"))
            killed(proc, log)
            names = sorted(p.name for p in out.iterdir())
            print(f"killed writing {shard}: {names}")
            assert f"{shard}.parquet" not in names
            assert [n.split(".tmp-")[0] for n in temp_files(out)] == [f"{shard}.parquet"]
            for name in out.glob("*.parquet"):  # whatever a reader can see is a whole shard
                assert pl.read_parquet(name).height == PER_SHARD
            assert not (root / "_current").exists()  # an unfinished set is nobody's current one
        assert {n: (out / n).read_bytes() for n in written} == written  # kept, not redone

    assert not temp_files(out), "a killed write's temporary file was left behind"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in want.iterdir())
    got = pl.read_parquet(sorted(out.glob("*.parquet")))
    expected = sorted(s * 100 + i for s in range(LABEL_SHARDS) for i in range(PER_SHARD))
    assert sorted(got["id"].to_list()) == expected  # every image once
    assert got["error"].null_count() == got.height
    for name in sorted(p.name for p in want.glob("*.parquet")):  # every file, to the byte
        assert (out / name).read_bytes() == (want / name).read_bytes(), name
    assert json.loads((root / "_current" / f"{tars.name}.json").read_text())["labeler"] == (
        want.parent.name
    )


# ---------------------------------------------------------------- coyo-platform run


def subset_of(root: Path) -> tuple[dict[str, pl.DataFrame], dict]:
    folder = root / "coyo_labeled_300m"
    parts = {p.name: pl.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}
    manifest = json.loads((folder / ".coyo" / "manifest.json").read_text())
    for part in manifest["parts"]:
        part["path"] = os.path.basename(part["path"])  # the roots differ
    return parts, manifest


def test_subset_writing_killed_then_rerun_equals_an_uninterrupted_run(
    cli_run: CliRun, tmp_path: Path
):
    """``coyo-platform run`` killed while it writes the 2nd part's subset (the 1st written, the
    plan made), then run again to the end; the session's uninterrupted run is the reference."""
    reference, root, log = cli_run.root, tmp_path / "data", tmp_path / "log"
    # the same inputs (downloads and labels), so the killed run reaches the subset sooner
    for folder in ("coyo700m_metadata", "downloaded_shards", "labeled_shards"):
        shutil.copytree(reference / folder, root / folder)

    cmd = [str(root) if arg == str(reference) else arg for arg in cli_run.cmd]
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    pattern = r"/coyo_labeled_300m/part-00001\.parquet$"
    proc = start(
        cmd, log, {**killed_before_replace(tmp_path, pattern), "DAGSTER_HOME": env["DAGSTER_HOME"]}
    )
    killed(proc, log)
    subset = root / "coyo_labeled_300m"
    seen = sorted(p.name for p in subset.iterdir() if p.name != ".coyo")  # not the card's
    print(f"killed with {seen} in {subset.name}")
    assert (root / "subset_plan" / "plan.json").exists()
    assert [n.split(".tmp-")[0] for n in seen] == ["part-00000.parquet", "part-00001.parquet"]
    assert ".tmp-" in seen[1]  # written whole, not renamed: invisible to readers
    pl.read_parquet(subset / "part-00000.parquet")

    finish(cmd, log, env)
    assert not temp_files(root), "a killed write's temporary file was left behind"
    got, got_manifest = subset_of(root)
    want, want_manifest = subset_of(reference)
    assert got.keys() == want.keys() == {"part-00000.parquet", "part-00001.parquet"}
    for name, frame in got.items():
        assert frame["id"].is_unique().all()
        assert frame.equals(want[name]), name
    assert got_manifest["complete"], got_manifest["problems"]
    assert got_manifest == want_manifest  # rows, bytes, plan digest
