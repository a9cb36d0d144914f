"""The house rules, drawn from the source: layered imports without circles, few floors, no project import
hidden inside a function, small files and functions, and reports that read JSON without torch."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = {"opt_mi", "sparsegpt_mi", "quant", "mutual_info", "channel_grouping", "datautils"}
# imports a function may make: heavy third-party-backed modules only some runs need (the comment says why)
MAX_FLOORS = 8
MAX_LINES = 420
MAX_PARAMS = 8


def _modules() -> dict[str, Path]:
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "miq").rglob("*.py"))
    out = {}
    for f in files:
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


@functools.cache
def _imports() -> dict[str, dict[str, list[tuple[int, bool]]]]:
    """module -> imported project module -> [(line, inside a function or a TYPE_CHECKING block)]."""
    out = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        deps: dict[str, list[tuple[int, bool]]] = {}
        for node in ast.walk(tree):
            for t in _targets(node):
                if t in MODULES and t != name and MODULES[t].name != "__init__.py":
                    deps.setdefault(t, []).append((node.lineno, node.col_offset > 0))
        out[name] = deps
    return out


def test_the_seed_files_stay_at_the_root_and_the_rest_is_in_the_package():
    assert {n for n in MODULES if "." not in n and n != "miq"} == SEED


def test_no_project_import_inside_a_function_or_for_types_only():
    hidden = [(m, t, line) for m, deps in _imports().items() for t, uses in deps.items()
              for line, inner in uses if inner]
    assert hidden == []


def test_no_import_circle_and_at_most_eight_floors():
    deps = {m: set(d) for m, d in _imports().items()}

    @functools.cache
    def floor(m: str, path: tuple = ()) -> int:
        assert m not in path, f"import circle: {' -> '.join(path + (m,))}"
        return 1 + max((floor(d, path + (m,)) for d in deps[m]), default=0)

    floors = {m: floor(m) for m in deps if not m.endswith(".__main__")}
    assert max(floors.values()) <= MAX_FLOORS, sorted(floors.items(), key=lambda x: -x[1])[:5]


def test_main_modules_are_only_entry_points():
    """``python -m miq.sweep`` / ``miq.report``: a ``__main__`` calls one module's ``main`` and holds nothing
    else, so it is not counted as a floor of its own."""
    for name, path in MODULES.items():
        if name.endswith(".__main__"):
            assert len(_imports()[name]) == 1 and len(path.read_text().splitlines()) <= 10, name


def test_files_are_small():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: c for n, c in long.items() if c > MAX_LINES} == {}


def test_functions_take_few_parameters():
    wide = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
                n = len([p for p in params if p.arg not in ("self", "cls")])
                if n > MAX_PARAMS:
                    wide.append((name, node.name, n))
    assert wide == []


@pytest.mark.parametrize("module", ["miq.report.markdown", "miq.report.results", "miq.run.config",
                                    "miq.run.flags", "miq.sweep.cli"])
def test_reading_results_and_sweeping_need_no_torch(module):
    """Reports read results without torch; the sweep starts without it too (it computes nothing itself, and
    torch was a second of every start), whatever it is asked to check: its flags, --out, --tasks."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_starting_a_run_imports_neither_scikit_learn_nor_matplotlib():
    """Every opt_mi.py process pays its imports, a --help or a refused flag included: scikit-learn (1.3 s with
    pandas and pyarrow) and matplotlib (1 s) are imported by the code that uses them."""
    code = "import sys, opt_mi; print(sorted({'sklearn', 'matplotlib', 'pandas'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def _imported_tests(path: Path, tests: set[str]) -> list[tuple[int, str]]:
    """(line, test module) for each import of one of ``tests`` in the file: at any depth, and in the Python
    source a test hands a child process as a string, since a test module imported there runs its module-level
    code (and its fixtures' imports) in that child too."""
    found = []

    def scan(tree: ast.AST, offset: int) -> None:
        for node in ast.walk(tree):
            found.extend((offset + node.lineno, t.split(".")[0]) for t in _targets(node) if t.split(".")[0] in tests)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
                try:
                    scan(ast.parse(node.value), offset + node.lineno - 1)
                except SyntaxError:
                    pass

    scan(ast.parse(path.read_text()), 0)
    return sorted(set(found))


def test_no_test_module_imports_another():
    """Each test file stands on its own: what tests share lives in conftest.py or a tests/*_helpers.py module,
    so running, moving or deleting one test file never changes another."""
    files = sorted((ROOT / "tests").glob("test_*.py"))
    tests = {f.stem for f in files}
    assert {f.name: hits for f in files if (hits := _imported_tests(f, tests))} == {}


def test_the_test_import_check_sees_every_form(tmp_path):
    src = tmp_path / "test_a.py"
    src.write_text('import os\nfrom test_b import x\n\n\ndef f():\n    import test_c.sub\n\n\n'
                   'CHILD = r"""\nimport sys\nimport test_d\n"""\nNOTE = "import what you need"\n'
                   'from sweep_helpers import y\n')
    assert _imported_tests(src, {"test_a", "test_b", "test_c", "test_d"}) == [(2, "test_b"), (6, "test_c"),
                                                                             (11, "test_d")]
