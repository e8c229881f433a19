"""Check `medexp train` overrides before Hydra runs anything: one-line errors, nothing built, no MLflow run.

Every value of every sweep is checked: the config is composed once with the first value of each sweep,
then once per other value of each swept key (1 + sum(len(values) - 1) compositions, 13 for the paper's
225-job grid), and each composition is range-checked by medexp.config.validate. Sweeps that an
experiment declares in `hydra.sweeper.params` are checked the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from medexp.config import CONF_DIR, GROUPS, ConfigError, group_choices, validate

PASSTHROUGH_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--shell-completion",
    "-sc",
}


def split_args(args: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun?, only-inspecting?) from the arguments of `medexp train`."""
    overrides = [a for a in args if not a.startswith("-")]
    multirun = "-m" in args or "--multirun" in args
    inspecting = any(a.split("=")[0] in PASSTHROUGH_FLAGS for a in args)
    return overrides, multirun, inspecting


def compose_config(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    """Compose conf/train.yaml with overrides (Hydra's compose API; used for checks and `medexp params`)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            return compose("train", overrides=overrides, return_hydra_config=hydra_cfg)
        except Exception as err:  # Hydra/OmegaConf errors are multi-line: reduce to one line
            raise ConfigError(_one_line(err, overrides)) from err
        finally:
            GlobalHydra.instance().clear()


def check(args: list[str]) -> int:
    """Raise ConfigError for the first bad override among `args` (a `medexp train` command line).

    Returns:
        The number of jobs the command will run (1 for a single run).
    """
    overrides, multirun, inspecting = split_args(args)
    if inspecting:
        return 1
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    sweeps: dict[str, list[str]] = {}
    fixed: list[str] = []
    for o in parsed:
        key = o.get_key_element()
        values = list(_values(o)) if o.is_sweep_override() else None
        if o.key_or_group in GROUPS and not o.is_delete():
            for value in values or [o.value()]:
                _check_choice(o.key_or_group, str(value))
        if values:
            sweeps[key] = values
        else:
            fixed.append(o.input_line)
    if multirun:
        base = compose_config(fixed + [f"{k}={v[0]}" for k, v in sweeps.items()], hydra_cfg=True)
        for key, value in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items():
            if key not in sweeps:
                sweeps[key] = [v.strip() for v in str(value).split(",")]
                if key in GROUPS:
                    for v in sweeps[key]:
                        _check_choice(key, v)
    for variant in _variants(fixed, sweeps):
        validate(compose_config(variant))
    return math.prod(len(v) for v in sweeps.values()) if multirun else 1


def _values(o) -> Iterator[str]:
    try:
        yield from o.sweep_string_iterator()
    except Exception:  # interval sweeps (optuna etc.) have no finite list of values to check
        return


def _variants(fixed: list[str], sweeps: dict[str, list[str]]) -> Iterator[list[str]]:
    first = {k: v[0] for k, v in sweeps.items()}
    yield fixed + [f"{k}={v}" for k, v in first.items()]
    for key, values in sweeps.items():
        for value in values[1:]:
            yield fixed + [f"{k}={value if k == key else v}" for k, v in first.items()]


def _check_choice(group: str, value: str) -> None:
    choices = group_choices(group)
    if value not in choices and value != "null":
        raise ConfigError(f"{group}={value}: unknown choice; allowed: {', '.join(choices)}")


def _one_line(err: Exception, overrides: list[str]) -> str:
    text = f"{err} {err.__cause__ or ''}"
    match = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' not in", text)
    if match and "not in" in text:
        key = match.group(1)
        parent, _, leaf = key.rpartition(".")
        allowed = _keys_of(parent, overrides)
        where = f"keys of {parent}" if parent else "top-level keys"
        return f"{key}: unknown key '{leaf}'; {where}: {', '.join(allowed)}"
    if "Error merging override" in text or "Value '" in text:
        cause = str(err.__cause__ or err).splitlines()[0]
        key = re.search(r"override (\S+)", text)
        return f"{key.group(1) if key else 'override'}: {cause}"
    return " ".join(str(err).split())


def _keys_of(parent: str, overrides: list[str]) -> list[str]:
    groups_only = [o for o in overrides if o.split("=")[0].lstrip("+~") in GROUPS]
    try:
        cfg = compose_config(groups_only)
    except ConfigError:
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
