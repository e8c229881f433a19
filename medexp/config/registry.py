"""The config tree is the registry: groups and their choices are read from conf/, never listed in code.

A group is a folder of conf/ (kernel/, loss/, head/, ...); its choices are the YAML files in it. Every
component choice names what it builds with `_target_`, so adding a loss or a dataset is adding a file.
Hydra's own settings (conf/hydra/, e.g. the SLURM launcher) are not a medexp group.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

# conf/ sits at the top of the repository; an installed wheel carries it as the package medexp.conf.
CONF_DIR = next(
    p
    for p in (Path(__file__).parents[1] / "conf", Path(__file__).parents[2] / "conf")
    if (p / "train.yaml").exists()
)
NOT_GROUPS = ("hydra",)


@cache
def groups(extra_dirs: tuple[Path, ...] = ()) -> tuple[str, ...]:
    """The config groups: every folder of conf/ (and of each `--config-dir` in `extra_dirs`) that holds
    choices, sorted."""
    found = {
        p.name
        for d in (*extra_dirs, CONF_DIR)
        if d.is_dir()
        for p in d.iterdir()
        if p.is_dir() and any(p.glob("*.yaml"))
    }
    return tuple(sorted(g for g in found if g not in NOT_GROUPS and not g.startswith(("_", "."))))


def group_choices(group: str, extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    """The choices of a config group: the YAML files in conf/<group>/ and in <dir>/<group>/ of each
    `--config-dir` (which Hydra searches first), sorted."""
    return sorted({p.stem for d in (*extra_dirs, CONF_DIR) for p in (d / group).glob("*.yaml")})


def experiment_files() -> list[Path]:
    """Every named experiment (conf/experiment/*.yaml): what the test suite composes and trains."""
    return sorted((CONF_DIR / "experiment").glob("*.yaml"))
