"""Layers point down: ops import nothing of otvllm's above them, layers only ops, models only
layers and ops; no two modules import each other, even through others; test modules share
code through tests/helpers.py only. Read from the source (every import statement, including
those inside functions and under TYPE_CHECKING)."""

import ast
import pathlib
import subprocess
import sys

import otvllm

ROOT = pathlib.Path(otvllm.__file__).parent
BELOW = {   # a package -> what it may import besides itself
    "otvllm.ops": set(),
    "otvllm.layers": {"otvllm.ops"},
    "otvllm.models": {"otvllm.layers", "otvllm.ops"},
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The otvllm modules that `name` imports (a package's attribute counts as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    found = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.startswith("otvllm") and target != name:
            found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_lower_layers_import_nothing_above_them():
    wrong = []
    for name, imported in _graph().items():
        for package, allowed in BELOW.items():
            if name == package or name.startswith(package + "."):
                ok = allowed | {package}
                wrong += [(name, target) for target in imported
                          if not any(target == p or target.startswith(p + ".") for p in ok)]
    assert wrong == []


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    for start in graph:   # a path from a module's imports back to itself
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for target in graph[node]:
                if target == start:
                    cycles.append(path)
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
    assert cycles == []


def test_the_clis_parser_does_not_import_torch():
    """The parser is built from EngineConfig's fields; building it must stay light."""
    code = ("import sys\nfrom otvllm.cli import build_parser\nbuild_parser()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_test_modules_share_code_through_helpers_not_each_other():
    tests = pathlib.Path(__file__).parent
    wrong = []
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [(path.name, n) for n in names if n.startswith(("tests.test_", "tests.conftest"))]
    assert wrong == []
