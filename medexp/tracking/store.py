"""MLflow store: which store a command uses, the client on it, experiments, run-context tags and the code
version.

Store resolution is the same for every command (docs/design.md §9): an explicit `tracking_uri`, else the
MLFLOW_TRACKING_URI environment variable, else sqlite:///outputs/mlflow.db. Artifacts of an experiment this
module creates in a sqlite store live next to the database file: `<folder of mlflow.db>/mlartifacts`
(outputs/mlartifacts for the default store), never in the working directory unless the store is there.
medexp.tracking is the only package that imports mlflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from importlib import metadata
from pathlib import Path

from medexp.config.paths import sqlite_file
from medexp.errors import DataError

DEFAULT_DB = Path("outputs") / "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
DEFAULT_ARTIFACTS = DEFAULT_DB.parent / ARTIFACTS_DIR  # the default store's
BUILD_INFO = Path(__file__).parents[1] / "_build_info.json"  # written into wheels by tools/build_backend.py

# MLflow's tqdm bars ("Downloading artifacts") on every model load would fill logs and stderr.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow retries a failed HTTP request 7 times with a backoff factor of 2 and waits 120 s for each answer:
# a server that is down cost 254-270 s before the first error (docs/faults.md "Stores"). Two retries and
# 30 s per request still ride out a server restart; `check_store` probes the server before any of it.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
PROBE_TIMEOUT = 5.0  # seconds the up-front probe of an http(s) store waits for an answer
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file
ELSEWHERE = "another store: --tracking-uri URI or MLFLOW_TRACKING_URI (the option wins)"


def resolve_uri(uri: str | None = None, create: bool = True) -> str:
    """tracking_uri if given, else $MLFLOW_TRACKING_URI, else the project's sqlite store (absolute path).

    `create=False` (read-only commands) leaves the default store's folder alone when it is missing."""
    if uri:
        return str(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if create:
        DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def check_store(uri: str, create: bool = True, write: bool = True) -> None:
    """Check, before a command uses it, that the store `uri` can serve it; each fault is one line.

    A sqlite store must be a SQLite database that passes `PRAGMA quick_check` (an empty file is refused,
    where MLflow would silently make a new store in it), exist unless `create`, and be writable with its
    folder (SQLite writes its journal there) when `write`; an http(s) store must answer within
    PROBE_TIMEOUT seconds. Other stores are left to MLflow.

    Raises:
        DataError: naming the store, the fault and how to point at another store.
    """
    database = sqlite_file(uri)
    if database is not None:
        _check_sqlite(uri, database.absolute(), create, write)
    elif uri.startswith(("http://", "https://")):
        _probe_server(uri)


def _check_sqlite(uri: str, database: Path, create: bool, write: bool) -> None:
    if not database.exists():
        if not create:
            raise DataError(f"no MLflow store at {database} ({uri}); {ELSEWHERE}")
        ancestor = next(p for p in database.parents if p.exists())
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise DataError(f"{uri}: cannot create the store: {ancestor} is not writable; {ELSEWHERE}")
        return
    if not database.is_file():
        raise DataError(f"{database}: not a file, so not an MLflow store; {ELSEWHERE}")
    try:
        with open(database, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise DataError(f"{database}: cannot be read ({err.strerror}); {ELSEWHERE}") from err
    if not header:
        raise DataError(
            f"{database}: an empty file, not an MLflow store (it is not replaced by a new one); remove it "
            f"to start a new store there, or use {ELSEWHERE}"
        )
    if header != SQLITE_HEADER:
        raise DataError(f"{database}: not a SQLite database (damaged, or another file); {ELSEWHERE}")
    _quick_check(database)
    if write and not os.access(database, os.W_OK):
        raise DataError(f"{database}: read-only, and this command writes to the store; {ELSEWHERE}")
    if write and not os.access(database.parent, os.W_OK | os.X_OK):
        raise DataError(
            f"{database.parent}: not writable, and SQLite writes its journal next to {database.name}; "
            f"{ELSEWHERE}"
        )


def _quick_check(database: Path) -> None:
    """SQLite's own consistency check (PRAGMA quick_check: every page and b-tree, no index contents), on
    a read-only connection: a truncated or damaged file is one line here, not a traceback later."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            result = con.execute("PRAGMA quick_check").fetchall()
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as err:
        raise DataError(f"{database}: damaged SQLite database ({err}); {ELSEWHERE}") from err
    if result != [("ok",)]:
        raise DataError(f"{database}: damaged SQLite database (quick_check: {result[0][0]}); {ELSEWHERE}")
    if tables and "alembic_version" not in tables:  # MLflow's schema version table
        raise DataError(f"{database}: a SQLite database but not an MLflow store; {ELSEWHERE}")


def _probe_server(uri: str) -> None:
    """One GET of the server's /health within PROBE_TIMEOUT: any HTTP answer means a server listens."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        return  # it answered (401, 404, ...): MLflow reports what the answer means
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"MLflow server {uri}: not reachable ({reason}); start it, or use {ELSEWHERE}"
        ) from err


_CHECKED: set[str] = set()


def client(uri: str):
    """An MlflowClient on `uri` (imported lazily: mlflow is slow to import) whose calls wait out a locked
    sqlite database (`LockRetrying`); a new sqlite store is created by one process at a time. The store
    is checked once per process first (`check_store`: a damaged or empty file, or a server that does not
    answer, is one line)."""
    from mlflow.tracking import MlflowClient

    with _creating(uri):  # checked inside: a store another process is creating is not "empty"
        if uri not in _CHECKED:
            check_store(uri, create=True, write=False)
            _CHECKED.add(uri)
        return LockRetrying(MlflowClient(tracking_uri=uri))  # MlflowClient opens (creates) the store


LOCK_WAIT_SECONDS = 120.0  # how long a call keeps retrying "database is locked" before it fails


class LockRetrying:
    """An MlflowClient whose calls are retried, with jittered exponential backoff (0.05 s doubling to 2 s,
    for up to LOCK_WAIT_SECONDS), while sqlite answers "database is locked".

    Parallel jobs (hydra/launcher=joblib, submitit) write to one sqlite file, which lets one writer in at a
    time; MLflow's sessions wait 20 s for the lock (PRAGMA busy_timeout) and then fail, which a store on a
    slow or network filesystem under many jobs can exceed. A locked write is rolled back, so repeating it
    cannot log anything twice. MLflow has no retry of its own.
    """

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            delay, deadline = 0.05, time.monotonic() + LOCK_WAIT_SECONDS
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as err:  # MlflowException or sqlalchemy's OperationalError
                    if "database is locked" not in str(err) or time.monotonic() > deadline:
                        raise
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(2 * delay, 2.0)

        return call


_CREATED: set[str] = set()


@contextlib.contextmanager
def _creating(uri: str):
    """One process at a time opens a sqlite store for the first time: an exclusive lock on `<file>.lock`
    (once per process and store).

    MLflow creates its tables when a client first opens a store; two processes doing so at once (two
    `medexp train` started together on a fresh store) leave a half-migrated file ("table ... already
    exists") that every later command fails on.
    """
    database = sqlite_file(uri)
    existing = database is not None and database.is_file() and database.stat().st_size > 0
    if uri in _CREATED or database is None or existing:  # an existing store: nothing to create, no lock
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{database}.lock", "a")  # noqa: SIM115 - closed by the with below
    except OSError as err:
        raise DataError(
            f"{uri}: cannot create the store ({err.strerror}: {err.filename}); {ELSEWHERE}"
        ) from err
    with lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
    _CREATED.add(uri)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of the store `uri` keeps its artifacts: `mlartifacts/` next to a sqlite
    file; None (the server's or MLflow's choice) for other stores."""
    database = sqlite_file(uri)
    return (database.parent / ARTIFACTS_DIR).resolve().as_uri() if database is not None else None


def experiment_id(mlflow_client, name: str) -> str:
    """Id of experiment `name`, created (artifacts next to a sqlite store) if missing."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=artifact_location(mlflow_client.tracking_uri)
        )
    except Exception:  # created meanwhile by a parallel job
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def run_context_tags(tags: dict[str, str] | None = None) -> dict[str, str]:
    """The tags MLflow's fluent API sets on a new run (mlflow.source.name, mlflow.source.type, mlflow.user,
    ...: MLflow's run-context providers), with medexp's code version as mlflow.source.git.commit, then
    `tags` (which win)."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags({"mlflow.source.git.commit": git_commit(), **(tags or {})})


def git_commit() -> str:
    """The commit of the medexp code that runs, or 'unknown' when nothing records it.

    In order: the git checkout medexp runs from (a clone, an editable install); the commit pip recorded in
    `direct_url.json` (pip install git+https://...@REV); the commit written into the wheel at build time
    (tools/build_backend.py); the checkout a plain `pip install /path/to/clone` was made from.
    """
    found = _git_head(Path(__file__).parent)
    if found:
        return found
    direct = _direct_url()
    vcs = direct.get("vcs_info", {}).get("commit_id")
    if vcs:
        return str(vcs)
    try:
        built = json.loads(BUILD_INFO.read_text()).get("git_commit")
    except (OSError, ValueError):
        built = None
    if built:
        return str(built)
    url = direct.get("url", "")
    if url.startswith("file://") and "dir_info" in direct:
        return _git_head(Path(url[len("file://") :])) or "unknown"
    return "unknown"


def _git_head(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=folder
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _direct_url() -> dict:
    """The PEP 610 record pip wrote when it installed medexp ({} if none)."""
    try:
        text = metadata.distribution("medexp").read_text("direct_url.json")
        return json.loads(text) if text else {}
    except (metadata.PackageNotFoundError, ValueError):
        return {}
