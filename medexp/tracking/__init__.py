"""MLflow tracking, the only package that imports mlflow: the store (store.py), one run per job (runs.py),
parent runs of sweeps (sweep.py) and read-side queries (queries.py)."""
