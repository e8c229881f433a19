"""Configuration: the registry read from conf/, the schema, value checks, composing and pre-flight checks
of command-line overrides, and building objects from `_target_`s (with an allowlist for configs read
back from checkpoints and MLflow)."""
