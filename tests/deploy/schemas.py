"""Where the deployment files' published schemas are: the npm packages of
tests/deploy/package-lock.json (dclint's Compose Specification schema, the @kubernetes-models
CRD models), which scripts/bootstrap --test installs into .venv/deploy-schemas where npm
exists.  Nothing of them is committed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / ".venv" / "deploy-schemas" / "node_modules"
PACKAGE = Path(__file__).with_name("package.json")


def installed(path: str) -> Path:
    """Return the file at *path* in the installed packages.

    Skips where npm is absent (a machine without node, where bootstrap installs none of
    them), and fails where npm exists but the file does not: bootstrap installs it there.
    """
    found = MODULES / path
    if found.exists():
        return found
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed, so neither are tests/deploy/package.json's schemas")
    pytest.fail(f"{found} is missing: run scripts/bootstrap --test")


def node() -> str:
    """Return the node that runs the installed models of package.json's @kubernetes-models
    packages (skips, or fails, as :func:`installed` does)."""
    dependencies = json.loads(PACKAGE.read_text())["dependencies"]
    for name in dependencies:
        if name.startswith("@kubernetes-models/"):
            installed(f"{name}/package.json")
    found = shutil.which("node")
    if found is None:
        pytest.skip("node is not installed, so the custom resources' models cannot run")
    return found
