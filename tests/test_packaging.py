"""environment.yml and pyproject.toml describe the same install."""

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_installs_every_extra_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*channels:\s*\n\s*-\s*conda-forge", env, re.M)
    assert re.search(r"^\s*-\s*pip\s*$", env, re.M)
    editable = re.search(r"-e \.\[([^\]]*)\]", env)
    assert editable, "environment.yml must pip-install the package itself (-e .[extras])"
    assert set(editable.group(1).split(",")) == set(project["optional-dependencies"])
    python = re.search(r"-\s*python=(\d+)\.(\d+)", env)
    minimum = tuple(int(v) for v in re.search(r">=(\d+)\.(\d+)", project["requires-python"]).groups())
    assert (int(python.group(1)), int(python.group(2))) >= minimum


def test_makefile_installs_the_same_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.search(r'-e "\.\[([^\]]*)\]"', (ROOT / "Makefile").read_text()).group(1)
    assert set(extras.split(",")) == set(project["optional-dependencies"])
    assert sys.version_info >= (3, 10)


def test_readme_performance_section_is_what_bench_report_renders():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.readme_section((ROOT / "README.md").read_text()) == report.render(), (
        "README.md's performance section is stale: run `python bench/report.py --write`")
