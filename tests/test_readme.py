"""The README documents every setting, with its default."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.settings import OPTIONS as LOADER
from sidecar.options import Option
from sidecar.settings import OPTIONS as SIDECAR

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize("opt", [*SIDECAR, *LOADER], ids=lambda o: f"{o.env}")
def test_every_setting_is_documented_with_its_default(opt: Option) -> None:
    default = "unset" if opt.default is None else f"`{opt.default}`"
    rows = [line for line in README.splitlines() if line.startswith(f"| `{opt.env}` |")]
    assert rows, f"{opt.env} is not in the README's settings tables"
    assert any(f"| `{opt.flag}` |" in row and default in row for row in rows), rows


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    assert "scripts/demo" in README and "scripts/test" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test" in ci
