"""Store faults (docs/faults.md "Stores"): a server nobody listens on, an empty, damaged or truncated
mlflow.db, a read-only store or folder, and a missing store for a read-only command are each one line
naming the store, exit 2, within seconds, and create nothing. Each fault has a CONTROL showing that it is
live when MLflow meets it directly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_medexp
from mlflow.tracking import MlflowClient

from medexp.errors import DataError
from medexp.tracking.store import check_store

NOBODY = 65534


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(folder: Path) -> Path:
    """A real MLflow store with one experiment."""
    database = folder / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").create_experiment("e")
    return database


def _one_line(result, command: str, expected: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"medexp {command}: error: "), result.stderr
    assert expected in lines[0] and "Traceback" not in result.stdout + result.stderr, lines[0]
    return lines[0]


@pytest.mark.e2e
def test_an_unreachable_server_is_one_line_within_seconds(tmp_path: Path):
    uri = f"http://127.0.0.1:{_free_port()}"
    for args in (["report", "--tracking-uri", uri], ["train", f"tracking_uri={uri}"]):
        start = time.monotonic()
        result = run_medexp(args, cwd=tmp_path, timeout=120)
        took = time.monotonic() - start
        line = _one_line(result, args[0], f"MLflow server {uri}: not reachable (")
        assert "--tracking-uri" in line and "MLFLOW_TRACKING_URI" in line
        assert took < 30, f"{args[0]}: {took:.1f} s"
    assert list(tmp_path.iterdir()) == [], "nothing created"


def test_control_mlflow_itself_hangs_or_fails_with_a_traceback_on_the_unreachable_server():
    """CONTROL: the raw client on the same kind of URI, even with retries off, gives no one-line answer
    within 30 s: a traceback, or still waiting (with MLflow's defaults it retried for 254-270 s)."""
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    code = (
        "from mlflow.tracking import MlflowClient\n"
        f"MlflowClient('http://127.0.0.1:{_free_port()}').search_experiments()"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
        )
    except subprocess.TimeoutExpired:
        return
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_an_empty_database_file_is_refused_not_replaced(tmp_path: Path):
    database = tmp_path / "mlflow.db"
    database.touch()
    with pytest.raises(DataError, match=r"mlflow.db: an empty file, not an MLflow store .*--tracking-uri"):
        check_store(f"sqlite:///{database}")
    assert database.stat().st_size == 0
    MlflowClient(f"sqlite:///{database}").search_experiments()  # CONTROL: MLflow silently makes a store
    assert database.stat().st_size > 0


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_database_is_one_line(tmp_path: Path, damage: str):
    database = _store(tmp_path)
    data = database.read_bytes()
    if damage == "garbage":
        database.write_bytes(b"not a database at all\n" * 100)
        expected = "not a SQLite database"
    else:
        database.write_bytes(data[: len(data) // 2])  # a copy cut off half-way (a full disk, a killed copy)
        expected = "damaged SQLite database"
    with pytest.raises(DataError, match=expected):
        check_store(f"sqlite:///{database}", write=False)
    with pytest.raises(Exception) as raw:  # CONTROL: MLflow's own error, a multi-line traceback in a CLI
        client = MlflowClient(f"sqlite:///{database}")
        client.search_experiments()
        for e in client.search_experiments():
            client.search_runs([e.experiment_id])
    assert not isinstance(raw.value, DataError)


@pytest.mark.e2e
def test_a_damaged_store_is_one_line_from_train_report_and_ui(tmp_path: Path):
    database = _store(tmp_path)
    database.write_bytes(database.read_bytes()[:4096])
    uri = f"sqlite:///{database}"
    for args in (
        ["train", f"tracking_uri={uri}"],
        ["report", "--tracking-uri", uri],
        ["ui", "--tracking-uri", uri],
    ):
        _one_line(run_medexp(args, cwd=tmp_path, timeout=300), args[0], "damaged SQLite database")


def _as_nobody(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -c code` as an unprivileged user: root writes to any file, so read-only needs another user."""
    prefix = (
        [] if os.geteuid() != 0 else ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    )
    env = {**os.environ, "HOME": str(cwd)}
    return subprocess.run(
        [*prefix, sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env
    )


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
def test_a_read_only_store_and_an_unwritable_folder_are_one_line():
    folder = Path(tempfile.mkdtemp(prefix="medexp-ro-"))  # not under pytest's 0700 tmp: the user must read it
    try:
        database = _store(folder)
        folder.chmod(0o755)
        database.chmod(0o444)
        check = (
            "from medexp.tracking.store import check_store\n"
            "try: check_store('sqlite:///{db}', write={write})\n"
            "except Exception as err: print(type(err).__name__, err)\n"
            "else: print('ok')"
        )
        out = _as_nobody(check.format(db=database, write=True), folder)
        assert out.stdout.startswith(f"DataError {database}: read-only, and this command writes"), out
        assert _as_nobody(check.format(db=database, write=False), folder).stdout.strip() == "ok", (
            "reading is fine"
        )
        raw = f"import sqlite3; sqlite3.connect('{database}').execute('create table t (x)')"
        assert "attempt to write a readonly database" in _as_nobody(raw, folder).stderr, "CONTROL"
        database.chmod(0o666)  # the file writable, its folder (root's, 0755) not: no journal can be made
        out = _as_nobody(check.format(db=database, write=True), folder)
        assert out.stdout.startswith(f"DataError {folder}: not writable, and SQLite writes its journal"), out
        assert "sqlite3.OperationalError" in _as_nobody(raw, folder).stderr, "CONTROL: the write fails"
        report = _as_nobody(
            f"import sys; sys.argv = ['medexp', 'report', '--tracking-uri', 'sqlite:///{database}']\n"
            "from medexp.cli import main; main()",
            folder,
        )
        assert report.returncode == 2 and report.stderr.count("\n") == 1, report.stderr
        assert "not writable, and SQLite writes its journal" in report.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.e2e
def test_read_only_commands_create_nothing_and_name_the_store(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    default = f"{empty}/outputs/mlflow.db"
    for args in (
        ["report"],
        ["evaluate", "0123456789abcdef"],
        ["predict", "runs:/0123456789abcdef/model", "-i", "in", "-o", "out"],
        ["ui", "--port", str(_free_port())],
    ):
        line = _one_line(run_medexp(args, cwd=empty, timeout=300), args[0], f"no MLflow store at {default}")
        assert "--tracking-uri URI or MLFLOW_TRACKING_URI" in line
    assert list(empty.iterdir()) == [], "no store, no outputs/ folder"
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    database = _store(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{database}"}
    result = run_medexp(["evaluate", "0123456789abcdef"], cwd=empty, env=env, timeout=300)
    line = _one_line(result, "evaluate", "0123456789abcdef")
    assert str(database) in line and "--tracking-uri" in line, line
    result = run_medexp(["report", "--experiment", "nope"], cwd=empty, env=env, timeout=300)
    _one_line(result, "report", "nope")
    assert list(empty.iterdir()) == [], "nothing in the working folder"
    assert sorted(p.name for p in elsewhere.iterdir()) == before, "nothing new next to the store"
