"""Write ``constraints.txt``: the exact versions of everything ``pip install -e ".[test]"`` brings in.

    python tools/lock.py            # rewrite constraints.txt from this environment (make lock)
    python tools/lock.py --check    # exit 1 when this environment differs from constraints.txt

The lock is read off the environment the suite last passed in, not resolved
anew: every distribution reachable from moepass's requirements (its
dependencies and every extra, markers evaluated here) with the version
installed now.  ``make install`` passes it to pip as a constraints file, so
``make demo`` / ``make test`` (and CI) install what was tested, while
``pyproject.toml`` keeps the ranges a user's ``pip install`` sees.  torch keeps
its local label (``+cpu``): the CPU build, never a CUDA wheel of the same version.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "constraints.txt")
def _project_requirements() -> list[Requirement]:
    """moepass's own requirements with every extra, read from pyproject.toml."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [Requirement(r) for r in extra]
    return requirements


def _closure(requirements: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of every distribution the requirements reach here."""
    found: dict[str, str] = {}
    pending = [(r, frozenset(r.extras)) for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{requirement.name} is required but not installed here: install it first") from None
        first_visit = name not in found
        found[name] = dist.version
        for text in dist.requires or []:
            child = Requirement(text)
            wanted = child.marker is None or any(child.marker.evaluate({"extra": e}) for e in ("", *extras))
            if wanted and (first_visit or any(child.marker and child.marker.evaluate({"extra": e}) for e in extras)):
                if canonicalize_name(child.name) != name:
                    pending.append((child, frozenset(child.extras)))
    found.pop("moepass", None)
    return found


def render(versions: dict[str, str]) -> str:
    """The constraints file's text."""
    today = datetime.date.today().isoformat()
    lines = [
        "# The versions the test suite last passed with (make test, CI): pip constraints, not requirements.",
        f"# Written by `make lock` (python tools/lock.py) on {today} from Python {platform.python_version()} "
        f"on {sys.platform}-{platform.machine()}.",
        "# pyproject.toml keeps the supported ranges; README \"Supported versions\" says how this is refreshed.",
    ]
    lines += [f"{name}=={versions[name]}" for name in sorted(versions)]
    return "\n".join(lines) + "\n"


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, re.M))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare this environment with constraints.txt")
    args = parser.parse_args(argv)
    versions = _closure(_project_requirements())
    if args.check:
        with open(LOCK) as handle:
            locked = _pins(handle.read())
        differ = {n: (locked.get(n), v) for n, v in versions.items() if locked.get(n) != v}
        for name, (old, new) in sorted(differ.items()):
            print(f"{name}: locked {old}, installed {new}")
        return 1 if differ else 0
    with tempfile.NamedTemporaryFile("w", dir=ROOT, delete=False, suffix=".tmp") as handle:
        handle.write(render(versions))
    os.replace(handle.name, LOCK)
    print(f"wrote {LOCK}: {len(versions)} pinned distributions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
