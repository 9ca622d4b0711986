"""The package's shape: each module imports only modules below it (no import circle), and none
grows past what one reader holds at once."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "tinylora_kernels")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 90


def _modules():
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield (rel[:-9] if rel.endswith(".__init__") else rel), path


def _graph():
    mods = dict(_modules())
    graph = {}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                deps.update(n for n in names if n in mods)
                deps.update(f"{target}.{a.name}" for a in node.names
                            if f"{target}.{a.name}" in mods)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        graph[mod] = deps - {mod}
    return graph


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state, stack = {}, []

    def visit(mod):
        state[mod] = "open"
        stack.append(mod)
        for dep in sorted(graph[mod]):
            if dep.startswith(mod + "."):
                continue                  # a package re-exporting its own modules
            if state.get(dep) == "open":
                circle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_no_module_is_too_long():
    long = {mod: n for mod, path in _modules()
            if (n := len(open(path, encoding="utf-8").read().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_is_too_long():
    # a long function reads as a few named steps instead (kernels included)
    long = {}
    for mod, path in _modules():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{mod}.{node.name}"] = n
    assert not long, long
