"""The molm package's modules import each other in one direction only (config -> ops -> modules -> model; loading,
generate, train, surgery, usage, evaluate, hf, cli above), counting imports inside functions too."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "molm")


def molm_imports(path: str, module: str) -> set[str]:
    """The molm modules that `module` (a file of the package) imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                base = node.module
                names = [base] if base else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("molm"):
                names = [node.module.removeprefix("molm").lstrip(".") or None]
                if names == [None]:
                    names = [a.name for a in node.names]
            else:
                continue
            found.update(n.split(".")[0] for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("molm."))
    modules = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py")} | {"_C"}
    return {m for m in found if m in modules and m != module}


def graph() -> dict[str, set[str]]:
    return {
        f[:-3]: molm_imports(os.path.join(PACKAGE, f), f[:-3])
        for f in os.listdir(PACKAGE)
        if f.endswith(".py") and f != "__init__.py"
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_inside_molm():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_layers_do_not_import_the_layers_above():
    edges = graph()
    for low in ("config", "reference", "ops", "modules", "cache", "model"):
        above = edges[low] & {
            "loading",
            "generate",
            "train",
            "surgery",
            "usage",
            "evaluate",
            "hf",
            "cli",
            "engine",
            "serve",
            "lm_eval",
            "quantization",
        }
        assert not above, f"molm/{low}.py imports {sorted(above)}"
