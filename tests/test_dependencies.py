"""pyproject.toml declares what the code imports, where it imports it, and nothing unused.

The library (``gram_jax/``) may import only the project's dependencies; tests, notebooks,
benchmarks, experiments, configs and ``train.py`` may also import the ``dev`` and ``torch``
extras. Every declared package is imported somewhere, except the few named below that are
tools or file formats rather than imports.
"""

import ast
import importlib.metadata
import json
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The package, the script folders and the modules a script imports from beside itself
# (``benchmarks/_timing.py``, ``tests/train_process.py``, ``experiments/summary.py``, ...).
LOCAL = {"gram_jax", "configs", "experiments", "benchmarks", "train"} | {
    p.stem
    for d in ("tests", "benchmarks", "experiments", "configs")
    for p in (ROOT / d).glob("*.py")
}
NOT_IMPORTED = {  # declared on purpose, never imported
    "symile": "tests/test_nmodal.py loads it with pytest.importorskip (the reference package)",
    "array-record": "the ArrayRecord format the TFDS builders write and Grain reads",
    "ruff": "the linter",
    "pytest-xdist": "pytest's -n workers",
    "nbmake": "pytest's --nbmake notebook runner",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {
        g: {_norm(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in reqs}
        for g, reqs in groups.items()
    }


def _imports(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return {m for m in out if m not in LOCAL and m not in sys.stdlib_module_names}


def _notebook_source(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _distributions(modules: set[str]) -> set[str]:
    """Distribution names of top-level modules (the module's own name when not installed)."""
    table = importlib.metadata.packages_distributions()
    return {_norm(d) for m in modules for d in table.get(m, [m])}


def _modules(where: str) -> set[str]:
    if where == "library":
        files = [p.read_text() for p in (ROOT / "gram_jax").rglob("*.py")]
    else:
        files = [
            p.read_text()
            for d in ("tests", "benchmarks", "experiments", "configs")
            for p in (ROOT / d).rglob("*.py")
        ]
        files += [(ROOT / "train.py").read_text()]
        files += [_notebook_source(p) for p in (ROOT / "notebooks").glob("*.ipynb")]
    return set().union(*(_imports(s) for s in files))


def test_library_imports_only_its_dependencies():
    missing = _distributions(_modules("library")) - _declared()["dependencies"]
    assert not missing, f"gram_jax imports packages pyproject.toml does not declare: {missing}"


def test_tests_notebooks_and_scripts_import_only_declared_packages():
    declared = set().union(*_declared().values())
    missing = _distributions(_modules("rest")) - declared
    assert not missing, f"imported but declared in no dependency group: {missing}"


def test_every_declared_package_is_imported():
    used = _distributions(_modules("library") | _modules("rest"))
    unused = set().union(*_declared().values()) - used - set(NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"
