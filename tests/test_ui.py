"""`medexp ui`: headless Chromium sees a real run's params and metrics; stopping leaves no process behind.

The browser is Debian's chromium (/usr/bin/chromium) driven by Playwright with executable_path, so no
browser download is needed; the browser test skips only when that binary is missing. Screenshots are kept
under outputs/test-artifacts/ of the repository.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY, run_medexp, store_uri
from mlflow.tracking import MlflowClient

from medexp.commands import ui

CHROMIUM = Path(os.environ.get("MEDEXP_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "outputs" / "test-artifacts"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A folder whose outputs/mlflow.db holds one real 1-epoch training run (experiment `ui`)."""
    cwd = tmp_path_factory.mktemp("ui")
    args = ["train", *TINY, "trainer.max_epochs=1", "eval.metrics=[dice]", "tracking.log_checkpoint=false"]
    result = run_medexp([*args, "experiment_name=ui"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(cwd: Path, port: int) -> subprocess.Popen:
    """`medexp ui --port PORT` in `cwd` (a subprocess), once it answers /health."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = (cwd / f"ui-{port}.log").open("w")
    command = [sys.executable, "-m", "medexp", "ui", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (cwd / f"ui-{port}.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("medexp ui did not serve within 180 s")


def cleanup(proc: subprocess.Popen) -> None:
    """After a failed test: stop medexp ui the normal way, and make sure its server group is gone too."""
    groups = {pid for pid in descendants(proc.pid) if ui.group_members(pid)}  # group leaders among them
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pgid in groups:
        if ui.group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)


def process_table() -> dict[int, tuple[int, str, str]]:
    """{pid: (ppid, state, start time)} of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of `pid`."""
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, state, started) in table.items():
            if ppid == parent and state != "Z" and child not in found:
                found[child] = started
                frontier.append(child)
    return found


def still_alive(processes: dict[int, str]) -> list[int]:
    """Those of {pid: start time} still running: same pid and start time (not a reused pid), not a zombie."""
    table = process_table()
    alive = {pid for pid, (_, state, _) in table.items() if state != "Z"}
    return [pid for pid, started in processes.items() if pid in alive and table[pid][2] == started]


def stop_and_check(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to medexp ui; it must exit 0 and take every process it started with it."""
    children = descendants(proc.pid)
    assert len(children) >= 2, f"expected mlflow server + uvicorn under medexp ui, got {children}"
    (leader,) = [pid for pid in children if process_table()[pid][0] == proc.pid]
    assert os.getpgid(leader) == leader != os.getpgid(proc.pid), "the server leads its own process group"
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    left = still_alive(children)
    assert not left, f"processes left behind: {left}"
    assert not ui.group_members(leader), "the server's process group is empty"


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on `port`."""
    found = []
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.append(address)
    return found


def test_build_command_binds_loopback_by_default():
    command = ui.build_command("sqlite:////tmp/x.db")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:////tmp/x.db"
    exposed = ui.build_command("sqlite:////tmp/x.db", host="0.0.0.0", port=6000)
    assert exposed[exposed.index("--host") + 1] == "0.0.0.0" and "6000" in exposed


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost.example.org"])
def test_a_host_beyond_loopback_gets_the_no_authentication_warning(host: str):
    assert "no authentication" in ui.exposure_warning(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "::1"])
def test_loopback_gets_no_warning(host: str):
    assert ui.exposure_warning(host) is None


@pytest.mark.slow  # creates a sqlite store
def test_serve_warns_and_marks_dead_runs_before_starting_the_server(tmp_path: Path, monkeypatch, capsys):
    from medexp.tracking import liveness

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    tags = {liveness.HOST_TAG: socket.gethostname(), liveness.PID_TAG: str(ended.pid)}
    run = client.create_run(client.create_experiment("dead"), tags=tags)  # RUNNING, its process gone
    seen = {}

    class NotStarted(Exception):
        pass

    def refuse(command):  # stands in for the mlflow server: only the order of events matters here
        seen["status"] = client.get_run(run.info.run_id).info.status
        raise NotStarted(command)

    monkeypatch.setattr(ui, "start", refuse)
    capsys.readouterr()  # MLflow's own lines about creating the store
    with pytest.raises(NotStarted):
        ui.serve(uri, host="0.0.0.0", port=free_port(), announce=print)
    err = capsys.readouterr().err
    assert err.startswith("medexp ui: warning: --host 0.0.0.0") and "no authentication" in err
    assert seen["status"] == "KILLED", "runs whose process died are marked before the server starts"


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ui_binds_127_0_0_1_and_a_signal_stops_everything(store: Path, sig: int):
    port = free_port()
    proc = start_ui(store, port)
    try:
        assert listening_addresses(port) == ["0100007F"], "only 127.0.0.1 listens"
        stop_and_check(proc, sig)
    finally:
        cleanup(proc)


@pytest.mark.e2e
def test_sigkill_of_medexp_ui_still_stops_the_server(store: Path):
    """medexp cannot clean up after SIGKILL; the server's parent-death signal takes it down instead."""
    proc = start_ui(store, free_port())
    children = descendants(proc.pid)
    try:
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while still_alive(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not still_alive(children), "server processes left behind"
    finally:
        for pid in still_alive(children):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
def test_browser_shows_run_params_and_metrics_then_ctrl_c_stops(store: Path, tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip(f"chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    client = MlflowClient(store_uri(store))
    exp = client.get_experiment_by_name("ui")
    (run,) = client.search_runs([exp.experiment_id])
    port = free_port()
    proc = start_ui(store, port)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 900},
            )
            page = browser.new_page()
            base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
            page.goto(f"{base}/runs")  # the training-runs table
            page.get_by_text(run.info.run_name).first.wait_for(timeout=90_000)
            page.screenshot(path=str(ARTIFACTS / "ui-experiment.png"))
            page.set_viewport_size({"width": 1400, "height": 4000})  # the run page scrolls inside a panel
            page.goto(f"{base}/runs/{run.info.run_id}")
            page.get_by_text("model.num_parameters").first.wait_for(timeout=90_000)
            page.screenshot(path=str(ARTIFACTS / "ui-run.png"))
            text = page.inner_text("body")
            browser.close()
        expect = {
            "trainer.max_epochs": "1",
            "loss._target_": run.data.params["loss._target_"],
            "model.num_parameters": run.data.params["model.num_parameters"],
            "test/dice_mean": _js_number(run.data.metrics["test/dice_mean"]),
            "val/dice_mean": _js_number(run.data.metrics["val/dice_mean"]),
        }
        for key, value in expect.items():
            assert re.search(rf"{re.escape(key)}\s+{re.escape(value)}\s", text), (key, value, text[:4000])
        assert run.info.run_name in text
        stop_and_check(proc, signal.SIGINT)
    finally:
        cleanup(proc)


def _js_number(value: float) -> str:
    """How the UI (JavaScript) prints a float: shortest round-trip repr, no trailing '.0'."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _status_with_host(port: int, host_header: str) -> int:
    """HTTP status of an API request (experiments/search; /health is exempt from the host check) on
    127.0.0.1:port sent with `host_header`, as a browser on another host that reached this machine by its
    name would send it."""
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers={"Host": host_header})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _serve_until_healthy(command: list[str], log: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no server within 300 s: {log.read_text()[-2000:]}")


@pytest.mark.e2e
def test_ui_beyond_loopback_answers_this_machine_by_name_and_logs_only_its_address(tmp_path: Path):
    """`--host 0.0.0.0` passes MLflow's --allowed-hosts, so a request naming this machine is served; the
    log holds the warning and the address only (no request lines, no Starlette deprecation notice).
    CONTROL: a plain `mlflow server --host 0.0.0.0` refuses the same request (its default allows
    localhost and private IPs only)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("ui")
    name = socket.gethostname()
    assert not name.startswith(("localhost", "127.", "10.", "192.168.")), "a name MLflow does not allow"
    port, log = free_port(), tmp_path / "ui.log"
    command = [
        sys.executable,
        "-m",
        "medexp",
        "ui",
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--tracking-uri",
        uri,
    ]
    proc = _serve_until_healthy(command, log, port)
    try:
        assert _status_with_host(port, f"{name}:{port}") == 200
        for _ in range(3):
            _status_with_host(port, f"localhost:{port}")
        stop_and_check(proc, signal.SIGINT)
    finally:
        cleanup(proc)
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    assert lines[0].startswith("medexp ui: warning: --host 0.0.0.0") and "no authentication" in lines[0]
    assert lines[1:] == [f"MLflow UI: http://0.0.0.0:{port}  (store {uri}; Ctrl-C stops it)"], lines
    port, log = free_port(), tmp_path / "raw.log"
    raw = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "0.0.0.0"]
    proc = _serve_until_healthy([*raw, "--port", str(port), "--workers", "1"], log, port)
    try:
        assert _status_with_host(port, f"{name}:{port}") in (400, 403), "CONTROL: refused without the setting"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
