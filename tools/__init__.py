"""Developer tools run from the repository root, not shipped in the wheel: the build backend
(build_backend.py, loaded by pyproject.toml's backend-path) and the import layering check
(`python -m tools.check_layers`, `from tools import check_layers` in tests)."""
