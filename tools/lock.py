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
#: The extra ``make install`` installs: its closure must be installed here; other extras are pinned when
#: they are (``quantized``'s torchao is kept out of the test environment on purpose: transformers imports it).
INSTALLED_EXTRA = "test"


def _project_requirements() -> tuple[list[Requirement], list[Requirement]]:
    """moepass's own requirements: (dependencies + the installed extra, the other extras), from pyproject.toml."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    extras = project.get("optional-dependencies", {})
    required = [Requirement(r) for r in project["dependencies"] + extras.get(INSTALLED_EXTRA, [])]
    optional = [Requirement(r) for name, extra in extras.items() if name != INSTALLED_EXTRA for r in extra]
    return required, optional


def _closure(requirements: list[Requirement], optional: list[Requirement] = ()) -> dict[str, str]:
    """{canonical name: installed version} of every distribution the requirements reach here.

    A distribution reached only through ``optional`` (an extra ``make install`` does not install) is
    pinned when it is installed here; when it is not, it keeps pyproject's own ``==`` pin if it has one.
    """
    found: dict[str, str] = {}
    roots = [(r, False) for r in requirements] + [(r, True) for r in optional]
    pending = [(r, frozenset(r.extras), skip) for r, skip in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
    while pending:
        requirement, extras, may_skip = pending.pop()
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            if may_skip:  # pinned as pyproject pins it (==), or left to the range
                exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
                if exact:
                    found.setdefault(name, exact[0])
                continue
            raise SystemExit(f"{requirement.name} is required but not installed here: install it first") from None
        first_visit = name not in found
        found[name] = dist.version
        for text in dist.requires or []:
            child = Requirement(text)
            wanted = child.marker is None or any(child.marker.evaluate({"extra": e}) for e in ("", *extras))
            if wanted and (first_visit or any(child.marker and child.marker.evaluate({"extra": e}) for e in extras)):
                if canonicalize_name(child.name) != name:
                    pending.append((child, frozenset(child.extras), may_skip))
    found.pop("moepass", None)
    return found


def render(versions: dict[str, str]) -> str:
    """The constraints file's text."""
    today = datetime.date.today().isoformat()
    lines = [
        "# The versions the test suite last passed with (make test, CI): pip constraints, not requirements.",
        f"# Written by `make lock` (python tools/lock.py) on {today} from Python {platform.python_version()} "
        f"on {sys.platform}-{platform.machine()}.",
        "# pyproject.toml keeps the supported ranges; docs/versions.md (\"Supported versions\") says how this is refreshed.",
    ]
    lines += [f"{name}=={versions[name]}" for name in sorted(versions)]
    return "\n".join(lines) + "\n"


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, re.M))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare this environment with constraints.txt")
    args = parser.parse_args(argv)
    versions = _closure(*_project_requirements())
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
