"""The architecture holds (docs/design.md §2, §10): import layers and no cycles, small files, conf/ as the
only registry, and design references that resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from medexp.config.registry import CONF_DIR, group_choices, groups

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
SETTINGS_GROUPS = ("trainer", "tracking", "experiment")  # settings and setups, not components


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_a_higher_layer_and_there_are_no_cycles():
    assert _load_script("check_layers").problems() == []


def test_the_cycle_finder_finds_a_cycle():
    layers = _load_script("check_layers")
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert layers.cycles(graph) == [["a", "b", "c"]]
    assert layers.cycles({"a": {"b"}, "b": set()}) == []


def test_no_python_file_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "medexp").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_gabor_layer_reads_in_one_sitting():
    text = (ROOT / "medexp" / "nn" / "gabor.py").read_text()
    assert len(text.splitlines()) <= 210
    assert "def gabor_kernel3d(" in text and "class GaborConv3d(" in text


def test_config_groups_come_from_the_tree_and_every_component_choice_has_a_target():
    folders = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    assert list(groups()) == folders
    for group in groups():
        if group in SETTINGS_GROUPS:
            continue
        for choice in group_choices(group):
            node = yaml.safe_load((CONF_DIR / group / f"{choice}.yaml").read_text())
            assert node.get("_target_") or "defaults" in node, f"conf/{group}/{choice}.yaml has no _target_"


def _design_sections() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    return set(re.findall(r"^## (\d+)\.", text, flags=re.MULTILINE))


def test_design_references_point_at_existing_sections():
    sections = _design_sections()
    files = [
        p
        for d in ("medexp", "tests", "scripts", "conf")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".yaml", ".c", ".h")
    ]
    dangling, stale = [], []
    for path in files:
        text = path.read_text()
        for ref in re.findall(r"docs/design\.md §(\d+)", text):
            if ref not in sections:
                dangling.append(f"{path.relative_to(ROOT)}: §{ref}")
        if re.search(r"DESIGN \d", text):
            stale.append(str(path.relative_to(ROOT)))
    assert dangling == [] and stale == []


@pytest.mark.parametrize("choice", group_choices("experiment"))
def test_every_experiment_composes(choice):
    from medexp.config.compose import compose_config
    from medexp.config.validate import validate

    validate(compose_config([f"experiment={choice}"]))
