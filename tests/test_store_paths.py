"""Where a run writes: next to the sqlite store the user named (output_root, the experiment's artifacts)."""

from medexp.config.compose import compose_config
from medexp.config.paths import output_root
from medexp.tracking.store import artifact_location


def test_output_root_is_the_folder_of_a_sqlite_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert output_root("sqlite:////data/exp/mlflow.db") == "/data/exp"
    assert output_root("sqlite:///outputs/mlflow.db") == "outputs", "the default store: outputs/ as before"
    assert output_root(None) == "outputs" and output_root("http://server:5000") == "outputs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////scratch/me/mlflow.db")
    assert output_root(None) == "/scratch/me", "the environment's store, as every command resolves it"


def test_run_folders_data_and_caches_follow_the_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_config(["tracking_uri=sqlite:////data/exp/mlflow.db", "dataset=nifti"], hydra_cfg=True)
    assert cfg.output_root == "/data/exp" and cfg.dataset.cache_dir == "/data/exp/cache"
    assert cfg.hydra.run.dir.startswith("/data/exp/runs/") and cfg.hydra.sweep.dir.startswith(
        "/data/exp/multirun/"
    )
    assert compose_config(["tracking_uri=sqlite:////data/exp/mlflow.db"]).dataset.root == "/data/exp/data"
    assert compose_config(["output_root=/scratch"]).dataset.root == "/scratch/data", "or where the user says"


def test_artifacts_live_next_to_a_sqlite_store(tmp_path):
    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://server:5000") is None, "a server decides for itself"
