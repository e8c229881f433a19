"""`medexp ui`: the MLflow tracking server and UI over the project's store (docs/design.md §9).

`mlflow server` runs as a child process in its own session, hence its own process group, bound to
127.0.0.1 unless told otherwise. The server process starts further processes (uvicorn and its workers);
SIGINT (Ctrl-C), SIGTERM and SIGHUP to medexp stop the whole group: SIGTERM to the group first, SIGKILL
for whatever is still alive after a grace period, so no server process outlives the command.

MLflow's background job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION) is switched off for this server: the
experiment UI does not need it, and its job processes start their own sessions, outside the group.

The MLflow server has no authentication: whoever reaches the port can read and change every run. It
therefore binds to loopback unless `--host` names another interface, and then medexp says so on stderr.
Before serving, the runs of this host whose process died are marked KILLED (medexp.tracking.liveness).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from medexp.tracking.liveness import mark_dead_runs
from medexp.tracking.store import DEFAULT_ARTIFACTS, artifact_location

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(host: str) -> str | None:
    """The warning for a server bound to `host` beyond this machine (None for loopback addresses)."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return (
        f"--host {host} serves the MLflow UI beyond this machine, and it has no authentication: anyone "
        "who can reach the port can read, change and delete every run; use the default (127.0.0.1) and "
        "an SSH tunnel instead where the network is not trusted"
    )


def build_command(
    uri: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = 1,
    allowed_hosts: str | None = None,
) -> list[str]:
    """The `mlflow server` command line for store `uri` (the interpreter running medexp runs mlflow too).

    With a sqlite store, artifacts uploaded through the server go to mlartifacts/ next to the database,
    where medexp's own runs keep theirs. Uvicorn logs warnings only (no line per request). MLflow's
    security middleware answers only requests whose Host header it allows (default: localhost and
    private IPs); a server bound beyond loopback also allows this machine's names and addresses
    (`allowed_host_headers`), or `allowed_hosts` as given (MLflow's --allowed-hosts syntax).
    """
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--registry-store-uri",
        uri,
    ]
    command += ["--host", host, "--port", str(port), "--workers", str(workers)]
    command += ["--uvicorn-opts", "--no-access-log --log-level warning"]
    if allowed_hosts or exposure_warning(host):
        command += ["--allowed-hosts", allowed_hosts or ",".join(allowed_host_headers(host))]
    if uri.startswith("sqlite:"):  # next to the database, where medexp's own runs keep theirs
        command += ["--artifacts-destination", artifact_location(uri) or str(DEFAULT_ARTIFACTS.resolve())]
    return command


def allowed_host_headers(host: str) -> list[str]:
    """MLflow's default Host headers (localhost, private IPs), plus this machine's host name, fully
    qualified name and addresses, and `host` itself unless it is a wildcard address, each on any port."""
    import socket

    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {socket.gethostname(), socket.getfqdn()}
    if host not in ("0.0.0.0", "::", ""):
        names.add(f"[{host}]" if ":" in host else host)
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:  # a host name that does not resolve: the names above still count
        pass
    own = sorted(n for n in names if n)
    return [*get_default_allowed_hosts(), *own, *(f"{n}:*" for n in own)]


def server_env() -> dict[str, str]:
    """The environment of the server: ours, without a job runner (see the module docstring)."""
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    # Starlette's deprecation notice about MLflow's own middleware (StarletteDeprecationWarning, a
    # UserWarning: a -W filter cannot name the class, starlette is not importable that early)
    quiet = "ignore:starlette.middleware.wsgi is deprecated:UserWarning"
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), quiet) if w)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server gets its store from --backend-store-uri only
    return env


def start(command: list[str]) -> subprocess.Popen:
    """Start `command` as the leader of a new session (and process group).

    On Linux the leader also gets SIGTERM when medexp dies without a chance to clean up (SIGKILL); the
    mlflow server forwards it to uvicorn and exits.
    """
    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(
        command,
        env=server_env(),
        start_new_session=True,
        preexec_fn=_term_when_parent_dies if linux else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    threading.Thread(target=_forward, args=(proc.stdout,), daemon=True).start()
    return proc


# Lines the MLflow server prints on every start that say nothing the user must act on (the address and the
# no-authentication warning are medexp's own lines); anything else it prints, errors included, is passed on.
NOISE = ("[MLflow] Security middleware enabled",)


def _forward(stream) -> None:
    """Copy the server's output to stderr, less the NOISE lines."""
    for line in stream:
        if not line.startswith(NOISE):
            sys.stderr.write(line)
            sys.stderr.flush()


def _term_when_parent_dies() -> None:
    """In the child, before exec: prctl(PR_SET_PDEATHSIG, SIGTERM)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, from /proc; elsewhere, [pgid] if signalable."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the process group led by `proc`: SIGTERM, then SIGKILL to whatever survives `grace` seconds."""
    pgid = proc.pid  # the leader of a new session: its pid is the group id
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_members(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + grace
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Stop(Exception):
    """Raised by the signal handlers to leave the wait in `serve`."""


def serve(
    uri: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    announce: Callable[[str], None] = print,
    allowed_hosts: str | None = None,
) -> int:
    """Run the MLflow server over `uri` until it exits or medexp gets SIGINT/SIGTERM/SIGHUP.

    Returns:
        0 when stopped by a signal, else the server's own exit code (e.g. 1 when the port is taken).
    """

    def handler(signum, _frame):
        raise _Stop(signum)

    warning = exposure_warning(host)
    if warning:
        print(f"medexp ui: warning: {warning}", file=sys.stderr)
    mark_dead_runs(uri)
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    proc = None
    try:
        proc = start(build_command(uri, host, port, allowed_hosts=allowed_hosts))
        shown = f"[{host}]" if ":" in host else host
        announce(f"MLflow UI: http://{shown}:{port}  (store {uri}; Ctrl-C stops it)")
        return proc.wait()
    except _Stop:
        return 0
    finally:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        if proc is not None:
            stop(proc)
        for sig, old in previous.items():
            signal.signal(sig, old)
