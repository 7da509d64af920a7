"""The package's shape: layers that point one way, no import circle, files and functions a reader can hold.

Every import inside codis_lib counts, at module level and inside functions (a function-local import is
still an arrow; it only hides a circle from Python). The layers, lowest first:

    typed_config, config, run_config, metrics_log, distributed -> data -> ot -> objectives (one file per poster
    term) -> codebook -> model -> checkpoint -> evaluation -> viz -> train -> course (the notebooks' set-up)
        -> codis_lib (the public face)

A module may import from its own layer or below. The limits (450 lines a file, 80 a function) are the
house rule that keeps each piece readable in one sitting.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "codis_lib"
LAYERS = {  # module-name prefix -> layer; the longest matching prefix wins
    "codis_lib.typed_config": 0, "codis_lib.config": 0, "codis_lib.run_config": 0, "codis_lib.metrics_log": 0,
    "codis_lib.distributed": 0, "codis_lib.cli_args": 0,
    "codis_lib.data": 1, "codis_lib.ot": 2, "codis_lib.objectives": 3, "codis_lib.codebook": 4,
    "codis_lib.model": 5, "codis_lib.checkpoint": 6, "codis_lib.evaluation": 7, "codis_lib.viz": 8,
    "codis_lib.train": 9, "codis_lib.course": 10, "codis_lib": 11,
}
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Return {dotted module name: path} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(name: str) -> int:
    best = max((prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _owner(name: str) -> str | None:
    """Return the package module an imported dotted name lives in (the submodule if it is one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _import_targets(node: ast.AST, package: str) -> list[str]:
    """Return the dotted names one AST node imports (plain and relative imports, import_module, lazy tables)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
        return [node.args[0].value] if node.args and isinstance(node.args[0], ast.Constant) else []
    if isinstance(node, ast.Dict):  # lazy export tables {"name": "codis_lib.module"}
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
                and v.value.startswith("codis_lib.")]
    return []


def _graph() -> dict[str, set[str]]:
    """Return {module: the package modules it imports}, leaving out a module's own package __init__."""
    graph = {}
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            for name in _import_targets(node, package):
                owner = _owner(name) if name.startswith("codis_lib") else None
                if owner and owner != module and not module.startswith(owner + "."):
                    targets.add(owner)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_or_sideways():
    graph = _graph()
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if _layer(target) > _layer(module)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_layer_check_sees_function_local_imports(tmp_path):
    # The check must catch an import hidden inside a function, or it would miss the circles it exists for.
    tree = ast.parse("def f():\n    from codis_lib.train.engine import train\n")
    names = [name for node in ast.walk(tree) for name in _import_targets(node, "codis_lib.model")]
    assert "codis_lib.train.engine" in names
    assert _layer("codis_lib.train.engine") > _layer("codis_lib.model.codis")


def test_files_and_functions_stay_short():
    too_long = []
    for module, path in sorted(MODULES.items()):
        source = path.read_text()
        lines = source.count("\n") + 1
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines (limit {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {length} lines "
                                    f"(limit {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)
