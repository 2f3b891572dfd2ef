"""What a fresh clone installs: the test extra covers every import of the suite, and `.ci/run`
builds its own environment with the README's test command."""

import ast
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_package_the_tests_import_is_declared_in_the_core_or_test_requirements():
    """A package left out of the test extra (tensorboardX once) fails collection on a fresh
    machine while passing on one where it was installed by hand."""
    project = PYPROJECT["project"]
    declared = {_requirement_name(r)
                for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    local = {p.stem for folder in ("tests", "scripts") for p in (ROOT / folder).glob("*.py")}
    local |= {"molf_jax", "tests"}
    distributions = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_modules(ROOT / "tests") - set(sys.stdlib_module_names)
                         - local):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported by tests/ but not in pyproject's dependencies or test extra: " \
                        f"{missing}"


def _readme_command(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(heading) + r".*?```bash\n(.*?)\n```", text, re.DOTALL)
    assert block, f"README.md has no bash block after {heading!r}"
    return block.group(1).strip()


def _pip_installs(command: str) -> list[list[str]]:
    """The package arguments of each ``pip install`` in a shell line (flags such as -q dropped,
    ``-e X`` kept as one argument)."""
    installs = []
    for part in re.split(r"&&|\n", command):
        if "pip install" not in part or part.lstrip().startswith("#"):
            continue
        words = shlex.split(part.replace('"$py"', "python"))
        if words[1:4] != ["-m", "pip", "install"]:
            continue
        args, rest = [], words[4:]
        while rest:
            word = rest.pop(0)
            if word == "-e":
                args.append("-e " + rest.pop(0))
            elif not word.startswith("-"):
                args.append(word)
        installs.append(args)
    return installs


def test_ci_builds_a_fresh_venv_and_runs_the_readmes_test_command_in_it():
    script = (ROOT / ".ci" / "run").read_text()
    venv = re.search(r"^venv=(\S+)", script, re.MULTILINE).group(1)
    assert f'python -m venv "$venv"' in script and 'py="$venv/bin/python"' in script
    # The environment lives inside the checkout, where git ignores it.
    ignored = subprocess.run(["git", "check-ignore", "-q", venv + "/bin/python"], cwd=ROOT)
    assert ignored.returncode == 0, f"{venv} is not ignored by .gitignore"
    # Every install and the test run use the venv's interpreter, never the machine's.
    for line in script.splitlines():
        if re.search(r"\bpip install\b|\bpytest\b", line) and not line.lstrip().startswith("#"):
            if "pytest" in line and "collected" in line:
                continue
            assert line.strip().startswith('"$py" -m'), line
    readme = _readme_command("**Run the tests:**")
    ci_installs = [args for args in _pip_installs(script) if args != ["pip"]]
    assert [sum(ci_installs, [])] == _pip_installs(readme)
    assert readme.rsplit("&&", 1)[1].strip() == "python -m pytest -q"
    assert '"$py" -m pytest -q\n' in script
    # pytest's "no tests collected" (exit 5) fails CI.
    assert '"$status" -eq 5' in script and "exit 1" in script
