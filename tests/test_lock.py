"""constraints.txt, the lock ``make install`` uses: it pins everything pyproject.toml names, within its ranges."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    text = (ROOT / "constraints.txt").read_text()
    return {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, re.M)}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += extra
    return [Requirement(t) for t in texts]


def test_the_lock_pins_every_requirement_within_pyprojects_range():
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is required but constraints.txt does not pin it: run make lock"
        version = Version(pins[name])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {name}=={version}, outside pyproject.toml's {requirement}"
        )


def test_the_lock_keeps_torch_on_its_cpu_build_and_make_install_uses_it():
    assert _pins()["torch"].endswith("+cpu")  # never a CUDA wheel of the same version
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK ?= constraints.txt" in makefile and "$(CONSTRAIN)" in makefile
