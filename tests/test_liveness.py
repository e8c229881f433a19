"""Runs whose process died are marked KILLED by the next medexp command; live ones, and those of other hosts,
are left alone (docs/design.md §9). Real processes, a real sqlite store in tmp_path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medexp.errors import DataError
from medexp.tracking import liveness

pytestmark = pytest.mark.slow  # creates a sqlite store (MLflow's migrations take seconds)


@pytest.fixture(scope="module")
def client_of(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('live') / 'mlflow.db'}"
    return uri, MlflowClient(uri)


@pytest.fixture
def store(client_of, request):
    """(uri, client, a new experiment): one sqlite store for the module, one experiment per test."""
    uri, client = client_of
    return uri, client, client.create_experiment(request.node.name)


def ended_process_tags() -> dict[str, str]:
    """The tags a run started by a process that has ended since would carry."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ticks = liveness.start_ticks(child.pid)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    namespace = os.readlink("/proc/self/ns/pid")
    child.kill()
    child.wait()
    return {
        liveness.HOST_TAG: socket.gethostname(),
        liveness.PID_TAG: str(child.pid),
        liveness.PROCESS_TAG: f"{boot}/{namespace}/{child.pid}/{ticks}",
    }


def test_identity_of_this_process_is_alive_and_of_an_ended_one_is_gone():
    mine = liveness.process_tags()
    assert mine[liveness.PID_TAG] == str(os.getpid())
    assert liveness.is_gone(mine) is False
    assert liveness.is_gone(ended_process_tags()) is True
    reused = {**mine, liveness.PROCESS_TAG: mine[liveness.PROCESS_TAG].rsplit("/", 1)[0] + "/1"}
    assert liveness.is_gone(reused) is True, "same pid, other start time: a reused pid, not the run's process"
    rebooted = {**mine, liveness.PROCESS_TAG: "another-boot/" + mine[liveness.PROCESS_TAG].split("/", 1)[1]}
    assert liveness.is_gone(rebooted) is True
    assert liveness.is_gone({**mine, liveness.HOST_TAG: "elsewhere"}) is None, "cannot be known from here"


def test_mark_dead_runs_kills_only_runs_of_this_host_whose_process_is_gone(store):
    uri, client, experiment = store
    dead = client.create_run(experiment, tags=ended_process_tags()).info.run_id
    alive = client.create_run(experiment, tags=liveness.process_tags()).info.run_id
    other = {**ended_process_tags(), liveness.HOST_TAG: "node-elsewhere"}
    remote = client.create_run(experiment, tags=other).info.run_id
    untagged = client.create_run(experiment).info.run_id  # not a medexp run
    finished = client.create_run(experiment, tags=ended_process_tags()).info.run_id
    client.set_terminated(finished, "FINISHED")

    assert dead in liveness.mark_dead_runs(uri)
    status = {
        run_id: client.get_run(run_id).info.status for run_id in (dead, alive, remote, untagged, finished)
    }
    assert status == {
        dead: "KILLED",
        alive: "RUNNING",
        remote: "RUNNING",
        untagged: "RUNNING",
        finished: "FINISHED",
    }
    assert "ended without closing" in client.get_run(dead).data.tags[liveness.ENDED_TAG]
    assert dead not in liveness.mark_dead_runs(uri), "marked once"


def test_take_over_refuses_a_live_run_and_notes_one_of_another_host(store):
    uri, client, experiment = store
    alive = client.create_run(experiment, tags=liveness.process_tags()).info.run_id
    with pytest.raises(DataError, match=f"run {alive}: still running .pid {os.getpid()}"):
        liveness.take_over(uri, alive)
    remote = client.create_run(experiment, tags={**liveness.process_tags(), liveness.HOST_TAG: "n7"})
    assert "host n7" in liveness.take_over(uri, remote.info.run_id)
    killed = client.create_run(experiment, tags=ended_process_tags()).info.run_id
    assert liveness.take_over(uri, killed) is None


def test_take_over_refuses_a_finished_run_and_a_run_of_another_store_and_records_its_owner(store):
    uri, client, experiment = store
    finished = client.create_run(experiment, tags=ended_process_tags()).info.run_id
    client.set_terminated(finished, "FINISHED")
    with pytest.raises(DataError, match=f"run {finished}: already FINISHED"):
        liveness.take_over(uri, finished)
    assert client.get_run(finished).info.status == "FINISHED", "refused before anything changed"
    with pytest.raises(DataError, match="run 0123abcd: not found in the MLflow store .*tracking_uri"):
        liveness.take_over(uri, "0123abcd")
    killed = client.create_run(experiment, tags=ended_process_tags()).info.run_id
    client.set_terminated(killed, "KILLED")
    assert liveness.take_over(uri, killed) is None
    run = client.get_run(killed)
    assert run.data.tags[liveness.PID_TAG] == str(os.getpid()), "the resuming process owns it from now"
    assert run.info.status == "KILLED", "reopened RUNNING only when training starts"


HOLD = """
import sys, time
from medexp.tracking import liveness
liveness.hold_run_folder(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_one_owner_per_run_folder_until_the_owner_dies(tmp_path: Path):
    """A process holding the run folder (as a training or resuming job does from before its data
    preparation) makes a second owner fail in one line naming it; once it is SIGKILLed the folder is free:
    the kernel drops the flock, nothing stale is left to clean up."""
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=f"being trained by pid {owner.pid} on {socket.gethostname()}"):
            liveness.hold_run_folder(tmp_path)
    finally:
        owner.kill()
        owner.wait()
    liveness.hold_run_folder(tmp_path)  # the dead owner's lock went with it
    liveness.hold_run_folder(tmp_path)  # held already by this process: nothing to do
    liveness.release_run_folders()
    assert liveness._held == {}


def test_an_unwritable_run_folder_is_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="file/x/.medexp.lock: cannot create the run's lock file"):
        liveness.hold_run_folder(tmp_path / "file" / "x")
