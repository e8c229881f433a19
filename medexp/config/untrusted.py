"""Configs read back from files medexp did not just compose: checkpoints, start records, MLflow models.

Such a config is data from elsewhere (docs/design.md §9, "Trusted and untrusted configs"). Building it runs
whatever its `_target_`s name, and OmegaConf runs resolvers while resolving, so a stored config could run
code in two ways: a `_target_` that names a function with side effects (`os.makedirs`,
`monai.utils.misc.run_cmd`, `torch.fx.graph_module._exec_with_source`, all under once-trusted prefixes), or
an interpolation that produces one on resolution (`${oc.decode:'{_target_: os.makedirs, ...}'}`), which a
check of the unresolved text does not see. `load_config` therefore:

- parses the YAML without resolving anything and refuses every `${` in any key or string value (a stored
  config is written resolved, so a genuine one has none);
- refuses every `_target_` not in an exact list: the targets conf/ names (walked, below), plus exact names
  the user lists in $MEDEXP_TRUSTED_TARGETS (comma-separated; no prefixes), plus, within the process that
  trained it, the run's own (`trusting`);
- only then types it by the schema. Each refusal is one ConfigError naming the file and the key.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medexp.config.registry import CONF_DIR
from medexp.errors import ConfigError

TRUSTED_TARGETS_ENV = "MEDEXP_TRUSTED_TARGETS"
NOT_STORED = ("hydra",)  # conf/hydra/ and train.yaml's `hydra:` never reach a stored config
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_trusted_now: list[str] = []  # targets of a config trusted for the moment (`trusting`)


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(key path, key, value) of every entry of a plain container, depth first; list items have key None."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        here = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}" if path else str(key)
        yield here, (None if isinstance(node, list) else key), value
        yield from _walk(value, here)


@cache
def conf_targets() -> frozenset[str]:
    """Every `_target_` that a YAML file of conf/ names (Hydra's own settings excepted): the registry."""
    found = set()
    for file in CONF_DIR.rglob("*.yaml"):
        if file.relative_to(CONF_DIR).parts[0] in NOT_STORED:
            continue
        data = yaml.safe_load(file.read_text()) or {}
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in NOT_STORED}
        found |= {v for _, k, v in _walk(data) if k == "_target_" and isinstance(v, str) and "${" not in v}
    return frozenset(found)


def user_targets() -> frozenset[str]:
    """The exact names of $MEDEXP_TRUSTED_TARGETS.

    Raises:
        ConfigError: an entry that is not a full dotted name (a prefix such as `mypkg.` is refused).
    """
    names = [n.strip() for n in os.environ.get(TRUSTED_TARGETS_ENV, "").split(",") if n.strip()]
    for name in names:
        if not _DOTTED.fullmatch(name):
            raise ConfigError(
                f"{TRUSTED_TARGETS_ENV}: {name!r} is not a full name such as mypkg.nets.MyNet "
                "(exact names only, no prefixes)"
            )
    return frozenset(names)


def allowed_targets() -> frozenset[str]:
    """conf/'s targets, the user's exact names and those trusted for the moment."""
    return conf_targets() | user_targets() | frozenset(_trusted_now)


@cache
def conf_interpolations() -> frozenset[tuple[str, str]]:
    """(key path, text) of every interpolation conf/ writes (`dataset.root`: `${output_root}/data`, ...):
    the only ones allowed in an unresolved config that Hydra or a job wrote from conf/ (`own_interpolations`
    of `load_config`), each at its own key only."""
    found = set()
    for file in CONF_DIR.rglob("*.yaml"):
        parts = file.relative_to(CONF_DIR).parts
        if parts[0] in NOT_STORED:
            continue
        text = file.read_text()
        package = re.search(r"^#\s*@package\s+(\S+)", text, re.MULTILINE)
        prefix = ".".join(parts[:-1]) if package is None else package[1]
        data = yaml.safe_load(text) or {}
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in (*NOT_STORED, "defaults")}
        start = "" if prefix == "_global_" else prefix
        found |= {(p, v) for p, _, v in _walk(data, start) if isinstance(v, str) and "${" in v}
    return frozenset(found)


@contextlib.contextmanager
def trusting(cfg: DictConfig) -> Iterator[None]:
    """Inside the block, `cfg`'s own targets are allowed too: for reading back, in the same process, what
    the user's own command line built (MLflow loads a model it logs to check its input example)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    added = [str(v) for _, k, v in _walk(container) if k == "_target_"]
    _trusted_now.extend(added)
    try:
        yield
    finally:
        del _trusted_now[len(_trusted_now) - len(added) :]


def check_plain(container: Any, source: str, own_interpolations: bool = False) -> None:
    """Refuse, in one line naming `source` and the key, any interpolation or resolver (`${`) in a key or a
    string value of a stored config (with `own_interpolations`, except conf/'s own at their own keys), and
    any `_target_` outside `allowed_targets()`."""
    allowed = allowed_targets()
    own = conf_interpolations() if own_interpolations else frozenset()
    for path, key, value in _walk(container):
        if isinstance(key, str) and "${" in key:
            raise ConfigError(f"{source}: key {path!r}: interpolations are refused in a stored config")
        if isinstance(value, str) and "${" in value and (path, value) not in own:
            raise ConfigError(
                f"{source}: {path}={_short(value)}: interpolations and resolvers are refused in a stored "
                "config (it is written resolved)"
            )
        if key == "_target_" and not (isinstance(value, str) and value in allowed):
            raise ConfigError(
                f"{source}: {path}={_short(value)} is not a target that medexp's conf/ names; "
                f"list its exact name in {TRUSTED_TARGETS_ENV} to trust it"
            )


def load_config(text: str, source: str | Path, own_interpolations: bool = False) -> DictConfig:
    """The config of a stored YAML text, checked (`check_plain`) before it is typed by the schema.

    Args:
        own_interpolations: allow conf/'s own interpolations at their own keys (a start record or Hydra's
            `.hydra/config.yaml`, which may be unresolved); checkpoints and MLflow models allow none.

    Raises:
        ConfigError: an interpolation, a target outside the list, or text that is not a config; one line.
    """
    from medexp.config.schema import TrainConfig

    try:
        raw = OmegaConf.create(text)  # parsed only: nothing is resolved
        container = OmegaConf.to_container(raw, resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:
        raise ConfigError(f"{source}: not a readable config ({_short(str(err), 200)})") from err
    if not isinstance(container, dict):
        raise ConfigError(f"{source}: not a config (a mapping of keys was expected)")
    check_plain(container, str(source), own_interpolations)
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: not a medexp config ({_short(str(err), 200)})") from err


def _short(value: Any, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
