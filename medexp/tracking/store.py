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

DEFAULT_DB = Path("outputs") / "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
DEFAULT_ARTIFACTS = DEFAULT_DB.parent / ARTIFACTS_DIR  # the default store's
BUILD_INFO = Path(__file__).parents[1] / "_build_info.json"  # written into wheels by tools/build_backend.py

# MLflow's tqdm bars ("Downloading artifacts") on every model load would fill logs and stderr.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_uri(uri: str | None = None) -> str:
    """tracking_uri if given, else $MLFLOW_TRACKING_URI, else the project's sqlite store (absolute path)."""
    if uri:
        return str(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_DB.resolve()}"


def client(uri: str):
    """An MlflowClient on `uri` (imported lazily: mlflow is slow to import) whose calls wait out a locked
    sqlite database (`LockRetrying`); a new sqlite store is created by one process at a time."""
    from mlflow.tracking import MlflowClient

    with _creating(uri):
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
    if uri in _CREATED or database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    with open(f"{database}.lock", "a") as lock:
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
