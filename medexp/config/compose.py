"""Check `medexp train` overrides before Hydra runs anything: one-line errors, nothing built, no MLflow run.

Every value of every sweep is checked: the config is composed once with the first value of each sweep,
then once per other value of each swept key (1 + sum(len(values) - 1) compositions, 13 for the paper's
225-job grid), and each composition is range-checked by medexp.config.validate. Sweeps that an
experiment or the chosen sweeper declares in `hydra.sweeper.params` are checked the same way; an interval
(Optuna) is checked at both ends. Every `_target_` must import (medexp.config.build.check_importable).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep
from omegaconf import DictConfig, OmegaConf

from medexp.config import schema  # noqa: F401 - registers the schema `base_train` that train.yaml names
from medexp.config.registry import CONF_DIR, group_choices, groups
from medexp.config.validate import validate
from medexp.errors import ConfigError

HELP_FLAGS = {"--help", "-h", "--hydra-help", "--shell-completion", "-sc"}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # `--info defaults`
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-name", "-cn")
# Where compose_config looks: Hydra's `--config-dir` folders (searched before conf/, as Hydra prepends them)
# and its `--config-name`, set by `searching` while `check` runs.
_EXTRA_DIRS: tuple[Path, ...] = ()
_CONFIG_NAME = "train"


def split_args(args: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun?, help only?) from the arguments of `medexp train`.

    Help needs no valid overrides; `--cfg job` and `--info` print a composed config, so their overrides
    are checked like a run's (one line instead of Hydra's multi-line error).
    """
    overrides, previous = [], ""
    for a in args:
        is_value = previous in VALUE_FLAGS or (previous in ("--info", "-i") and a in INFO_TOPICS)
        if not a.startswith("-") and not is_value:  # `--cfg job`: "job" is the flag's value
            overrides.append(a)
        previous = a
    multirun = "-m" in args or "--multirun" in args
    helping = any(a.split("=")[0] in HELP_FLAGS for a in args)
    return overrides, multirun, helping


def compose_config(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    """Compose conf/train.yaml with overrides (Hydra's compose API; used for checks and `medexp params`)."""
    GlobalHydra.instance().clear()
    with contextlib.ExitStack() as stack:
        if _EXTRA_DIRS:  # as Hydra's --config-dir: prepended to the search path, so it wins over conf/
            search = create_config_search_path(str(CONF_DIR))
            for folder in reversed(_EXTRA_DIRS):
                search.prepend("command-line", f"file://{folder}")
            Hydra.create_main_hydra2(task_name="app", config_search_path=search)
        else:
            stack.enter_context(initialize_config_dir(config_dir=str(CONF_DIR), version_base=None))
        try:
            return compose(_CONFIG_NAME, overrides=overrides, return_hydra_config=hydra_cfg)
        except Exception as err:  # Hydra/OmegaConf errors are multi-line: reduce to one line
            raise ConfigError(_one_line(err, overrides)) from err
        finally:
            GlobalHydra.instance().clear()


@contextlib.contextmanager
def searching(args: list[str]):
    """Compose as Hydra will for these `medexp train` arguments: with their `--config-dir` (-cd) folder
    searched first and their `--config-name` (-cn) as the primary config."""
    global _EXTRA_DIRS, _CONFIG_NAME
    saved = _EXTRA_DIRS, _CONFIG_NAME
    extra, name = [], "train"
    for flag, value in zip(args, [*args[1:], None], strict=True):
        key, eq, inline = flag.partition("=")
        value = inline if eq else value
        if key in ("--config-dir", "-cd") and value is not None:
            folder = Path(value).expanduser().resolve()
            if not folder.is_dir():
                raise ConfigError(f"--config-dir {value}: no such folder ({folder})")
            extra.append(folder)
        elif key in ("--config-name", "-cn") and value is not None:
            name = value
    _EXTRA_DIRS, _CONFIG_NAME = tuple(extra), name
    try:
        yield
    finally:
        _EXTRA_DIRS, _CONFIG_NAME = saved


def check(args: list[str], check_stores: Callable[[set], None] | None = None) -> int:
    """Raise ConfigError for the first bad override among `args` (a `medexp train` command line).

    Every value of every sweep is checked: choice and range sweeps value by value, interval sweeps (Optuna's
    `interval(...)`, `tag(log, interval(...))`) at both ends, globs of a group against its choices; the
    sweeps the chosen sweeper declares in `hydra.sweeper.params` the same way. Every `_target_` of every
    composition must import (a user's own `model._target_=mypkg.Net` is trusted, but must exist).

    Returns:
        The number of jobs the command will run (1 for a single run; `hydra.sweeper.n_trials` for Optuna).
        `check_stores`, if given, is called with the set of `tracking_uri`s of every composition (None: the
        default store) after the values are checked and before the targets are imported (torch).
    """
    overrides, multirun, helping = split_args(args)
    if helping:
        return 1
    with searching(args):
        return _check(args, overrides, multirun, check_stores)


def _check(args: list[str], overrides: list[str], multirun: bool, check_stores=None) -> int:
    printing = any(a in ("--cfg", "-c", "--info", "-i") for a in args)
    sweeps: dict[str, list[str]] = {}
    fixed: list[str] = []
    parsed = [_parse(line) for line in overrides]
    intervals = [o.input_line for o in parsed if isinstance(o.value(), IntervalSweep)]
    for o in parsed:
        key = o.get_key_element()
        values = _sweep_values(o) if o.is_sweep_override() else None
        if values is not None and not multirun:
            raise ConfigError(f"{o.input_line}: a sweep needs -m (--multirun)")
        if o.key_or_group in groups(_EXTRA_DIRS) and not o.is_delete():
            for value in values or [o.value()]:
                _check_choice(o.key_or_group, str(value))
        if values is not None:
            sweeps[key] = values
        else:
            fixed.append(o.input_line)
    jobs = math.prod(len(v) for v in sweeps.values()) if multirun else 1
    if multirun:
        base = compose_config(fixed + [f"{k}={v[0]}" for k, v in sweeps.items()], hydra_cfg=True)
        for key, value in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items():
            if key not in sweeps:
                sweeps[key] = _sweep_values(_parse(f"{key}={value}"), f"hydra.sweeper.params.{key}")
                if key in groups(_EXTRA_DIRS):
                    for v in sweeps[key]:
                        _check_choice(key, v)
        trials = OmegaConf.select(base, "hydra.sweeper.n_trials")
        if trials is None and intervals:
            raise ConfigError(
                f"{intervals[0]}: an interval needs a sweeper that samples it, e.g. hydra/sweeper=optuna"
            )
        jobs = int(trials) if trials is not None else math.prod(len(v) for v in sweeps.values())
    configs = [compose_config(variant) for variant in _variants(fixed, sweeps)]
    for cfg in configs:
        validate(cfg)
    if printing:  # --cfg or --info print only: no store, and no target import (which loads torch)
        return jobs
    if check_stores is not None:
        check_stores({cfg.tracking_uri for cfg in configs})
    from medexp.config.build import check_importable

    for cfg in configs:
        check_importable(cfg)
    return jobs


def _parse(line: str, where: str | None = None):
    """One override, parsed by Hydra's grammar; a parse error is one line naming it and Hydra's reason."""
    try:
        return OverridesParser.create().parse_overrides([line])[0]
    except Exception as err:  # OverrideParseException: "Error parsing override '...'\n<reason>\nSee ..."
        lines = [x for x in str(err).splitlines() if x.strip() and not x.startswith("See https")]
        reason = lines[-1] if lines else type(err).__name__
        raise ConfigError(f"{where or line}: cannot parse it ({reason})") from err


def _sweep_values(o, where: str | None = None) -> list[str]:
    """The values of a sweep override to check: every value of a choice or range, both ends of an
    interval, the matching choices of a glob over a group."""
    if not o.is_sweep_override():
        return [o.get_value_element_as_str()]
    value = o.value()
    if isinstance(value, IntervalSweep):
        return [f"{value.start}", f"{value.end}"]
    if isinstance(value, Glob):
        choices = group_choices(o.key_or_group, _EXTRA_DIRS) if o.key_or_group in groups(_EXTRA_DIRS) else []
        matched = value.filter(choices)
        if not matched:
            raise ConfigError(f"{where or o.input_line}: matches no choice; allowed: {', '.join(choices)}")
        return matched
    try:
        return list(o.sweep_string_iterator())
    except Exception as err:  # noqa: BLE001 - whatever Hydra raises for a sweep it cannot list
        raise ConfigError(f"{where or o.input_line}: cannot list the values of this sweep ({err})") from err


def _variants(fixed: list[str], sweeps: dict[str, list[str]]) -> Iterator[list[str]]:
    first = {k: v[0] for k, v in sweeps.items()}
    yield fixed + [f"{k}={v}" for k, v in first.items()]
    for key, values in sweeps.items():
        for value in values[1:]:
            yield fixed + [f"{k}={value if k == key else v}" for k, v in first.items()]


def _check_choice(group: str, value: str) -> None:
    choices = group_choices(group, _EXTRA_DIRS)
    if value not in choices and value != "null":
        raise ConfigError(f"{group}={value}: unknown choice; allowed: {', '.join(choices)}")


def _one_line(err: Exception, overrides: list[str]) -> str:
    text = f"{err} {err.__cause__ or ''}"
    missing = re.search(
        r"Could not find '([^']+)/([^'/]+)'\s+Available options in '[^']+':\s*(.*?)\s*Config search",
        text,
        re.S,
    )
    if missing:  # e.g. hydra/sweeper=nope
        hint = "; the Optuna sweeper needs pip install 'medexp[hpo]'" if missing[2] == "optuna" else ""
        return f"{missing[1]}={missing[2]}: unknown choice; allowed: {', '.join(missing[3].split())}{hint}"
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
    groups_only = [o for o in overrides if o.split("=")[0].lstrip("+~") in groups(_EXTRA_DIRS)]
    try:
        cfg = compose_config(groups_only)
    except ConfigError:
        return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
