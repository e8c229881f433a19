"""Which RUNNING MLflow runs still have a process (docs/design.md §9, "Runs whose process died").

SIGKILL, the OOM killer or a lost node leave no chance to end a run, so MLflow would show it RUNNING for
ever. Every medexp run therefore records the process that drives it: tags `medexp.host` (host name),
`medexp.pid` and `medexp.process` (boot id / pid namespace / pid / start time in clock ticks, from /proc,
so that a reused pid or a reboot is not mistaken for the run's process). A medexp command that opens the
store (train, report, ui; a sweep's skip_finished check runs inside train) calls `mark_dead_runs`, which
ends the runs of *this* host whose process is gone as KILLED; `medexp train resume=RUN_ID` then takes
such a run over (`take_over`).

Runs of other hosts (or of other pid namespaces, e.g. containers sharing the host name) are left as they
are: their processes cannot be seen from here, and a timeout cannot tell a dead node from a long epoch, a
long preprocessing or a suspended job. A stale RUNNING run misleads no result (report and skip_finished
count FINISHED runs only); its tags say where it ran, and `resume=RUN_ID` from any host takes it over.

One owner per run folder: the process that trains (or resumes) a run holds an exclusive lock on
`<output folder>/.medexp.lock` (flock(2), released by the kernel when the process dies, however it dies)
from before its data preparation to its end (`hold_run_folder`), so a second `resume` of the same run is
refused in one line while the first lives, even before the first has reopened the MLflow run.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

from medexp.config.paths import sqlite_file
from medexp.errors import DataError
from medexp.tracking.store import client

HOST_TAG = "medexp.host"
PID_TAG = "medexp.pid"
PROCESS_TAG = "medexp.process"
ENDED_TAG = "medexp.ended"
LOCK_FILE = ".medexp.lock"
_held: dict[str, int] = {}  # run folder -> descriptor of its lock file, while this process owns the run


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _boot_and_namespace() -> tuple[str, str]:
    """(boot id, pid namespace) of this machine and process; empty strings where /proc lacks them."""
    boot = (_read("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return boot, namespace


def start_ticks(pid: int | str = "self") -> str | None:
    """Start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22), or None when it
    does not exist or has ended (zombie)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ... (state is field 3)
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of proc(5), counted from field 3


def process_tags() -> dict[str, str]:
    """The tags that identify the current process as a run's owner."""
    boot, namespace = _boot_and_namespace()
    ticks = start_ticks() or ""
    identity = f"{boot}/{namespace}/{os.getpid()}/{ticks}" if boot and ticks else ""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PROCESS_TAG: identity}


def is_gone(tags: dict[str, str]) -> bool | None:
    """Whether the process recorded in a run's tags has ended: True, False, or None when it cannot be
    known from here (another host or pid namespace, or no process recorded)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    pid = int(tags[PID_TAG])
    identity = tags.get(PROCESS_TAG, "")
    if identity.count("/") >= 3:
        boot, namespace, _, ticks = identity.rsplit("/", 3)
        my_boot, my_namespace = _boot_and_namespace()
        if boot != my_boot:
            return True  # this host rebooted since: no process of that boot is left
        if namespace != my_namespace:
            return None  # another container with the same host name: its pids are not ours
        return start_ticks(pid) != ticks
    try:  # no /proc where the run started: only whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _running_here(mlflow_client) -> list:
    """RUNNING runs of every experiment that were started on this host."""
    experiments, token = [], None
    while True:
        page = mlflow_client.search_experiments(max_results=1000, page_token=token)
        experiments += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    host = socket.gethostname().replace("'", "\\'")
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    runs = []
    for i in range(0, len(experiments), 100):  # bounded experiment lists per query
        token = None
        while True:
            page = mlflow_client.search_runs(
                experiments[i : i + 100], query, max_results=1000, page_token=token
            )
            runs += list(page)
            token = page.token
            if not token:
                break
    return runs


def mark_dead_runs(uri: str) -> list[str]:
    """End the RUNNING runs of this host whose process is gone as KILLED (tag `medexp.ended` says why).

    Returns:
        the ids of the runs marked (none for a sqlite store that does not exist yet, which this does not
        create: `medexp report` must be able to say "no store").
    """
    database = sqlite_file(uri)
    if database is not None and not database.exists():
        return []
    mlflow_client = client(uri)
    marked = []
    for run in _running_here(mlflow_client):
        tags = run.data.tags
        if not is_gone(tags):
            continue
        current = mlflow_client.get_run(run.info.run_id)  # a resume may have taken it over meanwhile
        now = current.data.tags
        if current.info.status != "RUNNING" or now.get(PROCESS_TAG) != tags.get(PROCESS_TAG):
            continue
        why = f"process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)} ended without closing the run"
        mlflow_client.set_tag(run.info.run_id, ENDED_TAG, why)
        mlflow_client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    return marked


def take_over(uri: str, run_id: str) -> str | None:
    """Check that `resume` may reopen `run_id`, and record this process as its owner (process tags; the
    status is left as it is until training starts, so a resume that fails during data preparation leaves
    the run as it found it).

    Returns:
        None, or a notice when the run is RUNNING on a host whose processes cannot be seen from here.

    Raises:
        DataError: the run is not in the store `uri`, is FINISHED (a finished run is never reopened: its
            result would change or be lost), or its own process still runs on this host.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as err:
        raise DataError(
            f"run {run_id}: not found in the MLflow store {uri}; resume with the store it was trained in "
            "(tracking_uri=...)"
        ) from err
    if run.info.status == "FINISHED":
        raise DataError(
            f"run {run_id}: already FINISHED; a finished run is not resumed (its result would change), "
            "start a new run to train longer"
        )
    notice = _check_running(run_id, run) if run.info.status == "RUNNING" else None
    from mlflow.entities import RunTag

    mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in process_tags().items()])
    return notice


def _check_running(run_id: str, run) -> str | None:
    tags = run.data.tags
    gone = is_gone(tags)
    if gone is False:
        raise DataError(
            f"run {run_id}: still running (pid {tags[PID_TAG]} on {tags[HOST_TAG]}); "
            "stop that process before resuming the run"
        )
    if gone is None and tags.get(HOST_TAG):
        return (
            f"run {run_id} is marked RUNNING by pid {tags.get(PID_TAG)} on host {tags[HOST_TAG]}, which "
            "cannot be checked from here; resuming takes it over"
        )
    return None


def hold_run_folder(folder: str | Path) -> None:
    """Make this process the only owner of the run in `folder`: an exclusive flock(2) on its lock file,
    held until `release_run_folders` or the process's end (the kernel drops it on any death, SIGKILL
    included, so a lock is never left stale). Calling it again for a folder already held does nothing.

    Raises:
        DataError: another process holds the folder (it names that process); or the folder cannot be
            written (one line naming it).
    """
    key = str(Path(folder).resolve())
    if key in _held:
        return
    path = Path(key) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise DataError(f"{path}: cannot create the run's lock file: {err.strerror or err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataError(
            f"{key}: this run is being trained by {owner}; wait for it to end (or stop it) before resuming it"
        ) from None
    except OSError as err:  # a filesystem without locks (e.g. NFS without lockd): train, unguarded
        os.close(fd)
        warning = f"medexp: warning: {path}: no lock ({err.strerror}); a second resume would not be refused"
        print(warning, file=sys.stderr)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _held[key] = fd


def release_run_folders() -> None:
    """Give up every ownership taken by `hold_run_folder` (the job has ended; the lock files stay)."""
    while _held:
        os.close(_held.popitem()[1])  # closing the last descriptor releases the flock
