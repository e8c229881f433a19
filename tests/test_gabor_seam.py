"""Eq. 2's parameterisation lives in medexp.nn.gabor only: the fast paths (medexp.nn.fast) and their C
kernels compute with sums of separable complex kernels given by factors, whatever the factors mean
(docs/design.md §5, "How it is computed"). Whoever changes eq. 2 edits one readable Python module."""

from __future__ import annotations

import re
from pathlib import Path

import medexp.nn

NN = Path(medexp.nn.__file__).resolve().parent
# the parameters' names and what they are: width, orientation, phase, amplitude
EQ2_WORDS = re.compile(r"sigma|theta|phi|psi|amplitude|angle", re.IGNORECASE)
MAX_PYTHON_MODULES = 2  # medexp.nn's modules (the heads aside) that may spell out eq. 2's parameters


def _mentions(path: Path) -> list[str]:
    return sorted({m.group(0).lower() for m in EQ2_WORDS.finditer(path.read_text())})


def test_the_c_kernels_know_nothing_of_eq2():
    sources = sorted((NN / "fast" / "csrc").iterdir())
    assert sources, "no C sources found"
    assert {p.name: _mentions(p) for p in sources if _mentions(p)} == {}


def test_eq2_is_spelled_out_in_at_most_two_python_modules():
    modules = {
        str(p.relative_to(NN)): _mentions(p)
        for p in sorted(NN.rglob("*.py"))
        if p.name != "heads.py" and _mentions(p)
    }
    assert len(modules) <= MAX_PYTHON_MODULES, modules
    assert "gabor.py" in modules  # CONTROL: the check finds the definition's own words
    assert {"sigma", "theta", "psi", "angle"} <= set(modules["gabor.py"])
    assert not [name for name in modules if name.startswith("fast")], modules
