"""The versions of attn_jax's dependencies that CI tests, and one warning line for any other.

The tested ranges are pyproject.toml's bounds (from the oldest version CI tests to below the next
minor release after the newest; constraints.txt and constraints-newest.txt are the two sets). A
version outside them is allowed, not refused: it usually works, but JAX's numerics, flax's
parameter trees or orbax's checkpoint format may differ from what the tests check.
"""

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements() -> list[Requirement]:
    """attn_jax's own requirements (not its extras'): from the pyproject.toml beside the package in
    a checkout, else from the installed package's metadata; [] where neither is found."""
    if _PYPROJECT.is_file():
        project = tomllib.loads(_PYPROJECT.read_text()).get("project", {})
        if project.get("name") == "attn_jax":
            return [Requirement(line) for line in project.get("dependencies", [])]
    try:
        lines = importlib.metadata.requires("attn_jax") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in map(Requirement, lines) if r.marker is None]


def untested(installed=importlib.metadata.version) -> list[str]:
    """"NAME VERSION (tested SPECIFIER)" for each installed requirement outside its bounds;
    `installed(name)` gives a distribution's version (raising PackageNotFoundError if absent)."""
    found = []
    for requirement in requirements():
        try:
            version = installed(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # missing: the import that needs it says so
        try:
            inside = requirement.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            found.append(f"{requirement.name} {version} (tested {requirement.specifier})")
    return found


def untested_warning(installed=importlib.metadata.version) -> str | None:
    """The one warning line naming each dependency outside its tested bounds, or None."""
    found = untested(installed)
    if not found:
        return None
    return (f"warning: attn_jax is not tested with {', '.join(found)}: results may differ "
            f"from the tested ones (`pip install -e .` in a new environment installs tested versions)")


def warn_if_untested() -> None:
    """Prints `untested_warning()` to stderr where there is one."""
    if line := untested_warning():
        print(line, file=sys.stderr, flush=True)
