"""The package's shape, read from the source: the import graph (module-level and function-level
imports alike) has no cycle, a function imports lazily only an optional heavy dependency, no
private name crosses a subpackage, and modules and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "fastunlearn"
KERNELS = ROOT / "kernels"

# What a function may import lazily: optional dependencies that are heavy or absent on some
# machines (PIL only for the authors' reference loop, threadpoolctl only to cap BLAS threads
# where it is installed), and the Triton kernels, which import triton at their top.
LAZY_OK = ("matplotlib", "sklearn", "triton", "scipy", "pydicom", "torchvision", "PIL", "threadpoolctl",
           "fastunlearn.kernels")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100

# Known exceptions still to be split. The test below also fails when one of them has come under
# its limit, so that the list only shrinks.
OVERSIZED_MODULES: set = set()
OVERSIZED_FUNCTIONS: set = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    for path in sorted(KERNELS.glob("*.py")):
        name = "fastunlearn.kernels" + ("" if path.stem == "__init__" else "." + path.stem)
        mods[name] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(target module, imported names, whether the import is inside a function or class, line)."""
    tree = ast.parse(MODULES[module].read_text())
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], id(node) in nested, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:
                    yield sub, [], id(node) in nested, node.lineno
                else:
                    yield target, [a.name], id(node) in nested, node.lineno


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _, _ in _imports(m):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _subpackage(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and (f"{parts[0]}.{parts[1]}" in MODULES and _is_package(f"{parts[0]}.{parts[1]}")):
        return parts[1]
    if len(parts) == 2 and _is_package(module):
        return parts[1]
    return ""  # the top-level modules


def test_modules_found():
    assert "fastunlearn.engine.search" in MODULES and "fastunlearn.kernels.boundary_step" in MODULES


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lazy_imports_only_for_optional_dependencies():
    bad = []
    for m in MODULES:
        for target, _, lazy, line in _imports(m):
            if lazy and not any(target == ok or target.startswith(ok + ".") for ok in LAZY_OK):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_subpackage():
    bad = []
    for m in MODULES:
        for target, names, _, line in _imports(m):
            if not target.startswith("fastunlearn") or target not in MODULES:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.rsplit(".", 1)[-1].startswith("_") and not _is_package(target):
                private.append(target)
            if private and _subpackage(m) != _subpackage(target):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def _function_lengths():
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{m}.{node.name}", node.end_lineno - node.lineno + 1


def test_modules_are_short():
    long = {m for m, p in MODULES.items() if len(p.read_text().splitlines()) > MAX_MODULE_LINES}
    assert long <= OVERSIZED_MODULES, f"modules over {MAX_MODULE_LINES} lines: {sorted(long - OVERSIZED_MODULES)}"
    assert OVERSIZED_MODULES <= long, f"now short, drop from OVERSIZED_MODULES: {sorted(OVERSIZED_MODULES - long)}"


def test_functions_are_short():
    long = {name for name, n in _function_lengths() if n > MAX_FUNCTION_LINES}
    assert long <= OVERSIZED_FUNCTIONS, f"over {MAX_FUNCTION_LINES} lines: {sorted(long - OVERSIZED_FUNCTIONS)}"
    assert OVERSIZED_FUNCTIONS <= long, f"now short, drop from the list: {sorted(OVERSIZED_FUNCTIONS - long)}"



def test_test_files_have_unique_names():
    # The test folders have no __init__.py, so pytest imports each test file by its basename:
    # two files of one name in different folders make the second fail to collect.
    seen: dict = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    repeated = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not repeated, f"test files share a name: {repeated}"
