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


def _third_party_imports(paths) -> set[str]:
    import ast

    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "lorekit"}


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_what_lorekit_imports():
    """Runtime dependencies are the distributions lorekit/ imports; the notebook support modules' imports are in the
    notebooks extra, submitit in the cluster extra; the cross-check's pyautoattack is a test dependency only."""
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_distribution(r) for r in project["dependencies"]}
    extras = {k: {_distribution(r) for r in v} for k, v in project["optional-dependencies"].items()}
    provided = {k: {d.lower().replace("_", "-") for d in v} for k, v in packages_distributions().items()}
    imports = _third_party_imports((ROOT / "lorekit").rglob("*.py"))
    optional = set().union(*(v for k, v in extras.items() if k != "test"))  # imported lazily, where used
    imports -= {"wandb"}  # report_to='wandb' uses it when the user has installed it; never required
    for name in sorted(imports):
        dists = provided.get(name, {name})
        assert dists & (core | optional), f"lorekit imports {name!r} ({dists}), declared nowhere"
    used = set().union(*(provided.get(n, {n}) for n in imports))
    # clip-benchmark: read as package data (class names, templates); tensorboard: through torch.utils.tensorboard
    indirect = {"clip-benchmark", "tensorboard"}
    assert core - used == indirect, f"declared but not imported by lorekit/: {core - used - indirect}"
    assert "pyautoattack" in extras["test"] and "pyautoattack" not in core and "pyautoattack" not in imports
    assert any(r.startswith("open_clip_torch") and "<4" in r for r in project["dependencies"])
