"""The house keeps its layers: read from the code's own runtime imports (imports under
``if TYPE_CHECKING:`` are for type checkers only and are left out).

- the pure core imports nothing of ours outside the core, and no I/O library;
- nothing in the package imports the top-level main.py or handler.py;
- no runtime import cycle, and at most 7 floors of imports among our modules;
- main.py and handler.py are the only Python files at the top;
- no class over 350 lines, no function over 80.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bridge"
# I/O and concurrency: what the core must never need.
IO_MODULES = {"asyncio", "aiohttp", "nats", "panini", "socket", "subprocess", "multiprocessing", "os",
              "ssl", "urllib.request", "http"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    files = [ROOT / "main.py", ROOT / "handler.py", *PACKAGE.rglob("*.py")]
    return {module_name(f): f for f in files}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs (dotted names, as written)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking_only(node)
                   for child in node.body for n in ast.walk(child)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@cache
def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: {m for m in runtime_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def floors() -> dict[str, int]:
    edges = graph()
    memo: dict[str, int] = {}

    def floor(name: str, path: tuple[str, ...] = ()) -> int:
        assert name not in path, f"runtime import cycle: {' -> '.join((*path, name))}"
        if name not in memo:
            memo[name] = 1 + max((floor(m, (*path, name)) for m in edges[name]), default=0)
        return memo[name]

    return {name: floor(name) for name in edges}


def test_the_core_imports_nothing_of_ours_outside_the_core_and_no_io():
    for name, path in our_modules().items():
        if not name.startswith("bridge.core."):
            continue
        imports = runtime_imports(path)
        ours = {m for m in graph()[name] if not m.startswith("bridge.core")}
        io = {m for m in imports if m in IO_MODULES or m.split(".")[0] in IO_MODULES}
        assert (ours, io) == (set(), set()), f"{name} imports {ours or io}"


def test_the_package_never_imports_the_top_level_modules():
    for name, imports in graph().items():
        if name.startswith("bridge"):
            assert not imports & {"main", "handler"}, f"{name} imports {imports & {'main', 'handler'}}"


def test_no_runtime_import_cycle_and_at_most_seven_floors():
    levels = floors()  # asserts there is no cycle
    top = max(levels.values())
    assert top <= 7, sorted(levels.items(), key=lambda kv: -kv[1])[:5]


def test_main_and_handler_are_the_only_python_files_at_the_top():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["handler.py", "main.py"]


def test_no_class_over_350_lines_and_no_function_over_80():
    too_long = []
    for path in [*our_modules().values(), *ROOT.glob("services/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > (350 if isinstance(node, ast.ClassDef) else 80):
                    too_long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert too_long == []
