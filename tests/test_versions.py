"""attn_jax.versions: the tested bounds of the dependencies, and one warning line outside them."""

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from attn_jax import versions

ROOT = Path(__file__).resolve().parents[1]


def _installed(table: dict[str, str]):
    """A stand-in for importlib.metadata.version: `table`'s versions, others not installed."""
    def version(name: str) -> str:
        if name not in table:
            raise importlib.metadata.PackageNotFoundError(name)
        return table[name]
    return version


def test_the_bounds_come_from_pyproject():
    bounds = {r.name: r.specifier for r in versions.requirements()}
    assert Version("0.10.2") in bounds["jax"] and Version("0.12.1") in bounds["jax"]
    assert Version("0.9.2") not in bounds["jax"] and Version("0.13.0") not in bounds["jax"]


def test_this_environment_is_a_tested_one():
    """CI's two sets (constraints.txt, constraints-newest.txt) lie inside the bounds."""
    assert versions.untested() == []
    assert versions.untested_warning() is None


def test_an_untested_version_gets_one_line_naming_it_and_the_bounds():
    installed = _installed({"jax": "0.9.2", "flax": "0.13.0", "optax": "0.2.8"})
    line = versions.untested_warning(installed)
    assert line.startswith("warning: attn_jax is not tested with ") and "\n" not in line
    bounds = {r.name: r.specifier for r in versions.requirements()}
    assert f"jax 0.9.2 (tested {bounds['jax']})" in line
    assert f"flax 0.13.0 (tested {bounds['flax']})" in line
    assert "optax" not in line  # its oldest tested version: inside


def test_a_missing_package_is_left_to_its_import():
    assert versions.untested(_installed({"jax": "0.12.1"})) == []


def test_a_development_build_inside_the_bounds_is_tested():
    assert versions.untested(_installed({"jax": "0.12.2.dev20270101"})) == []


@pytest.mark.parametrize("constraints", ["constraints.txt", "constraints-newest.txt"])
def test_each_pinned_set_lies_inside_the_bounds(constraints):
    """Every pin of CI's sets that pyproject.toml bounds satisfies the bound (its extras too)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [d for extra in project["optional-dependencies"].values()
                                       for d in extra if not d.startswith("attn_jax")]
    bounds = {_name(r.name): r.specifier for r in map(Requirement, lines)}
    pins = [line.split("==") for line in (ROOT / constraints).read_text().splitlines()
            if line and not line.startswith("#")]
    outside = [f"{name}=={version}" for name, version in pins
               if _name(name) in bounds and Version(version) not in bounds[_name(name)]]
    assert outside == [], f"{constraints} pins outside pyproject.toml's bounds"
    assert {"jax", "flax", "numpy"} <= {_name(name) for name, _ in pins}


def _name(name: str) -> str:
    return name.lower().replace("_", "-")
