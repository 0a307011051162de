"""The package's modules import each other without a cycle, counting the imports inside
functions too (a lazy import hides a cycle from Python, not from a reader)."""

import ast
import os
import subprocess
import sys

import ddpm_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "ddpm_jax"
PACKAGE_DIR = os.path.dirname(os.path.abspath(ddpm_jax.__file__))


def _module_names() -> set[str]:
    return {name[:-3] for name in os.listdir(PACKAGE_DIR) if name.endswith(".py")}


def _imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package modules a module's source imports, at any depth of its code."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` / `from .x import y`
                base = ".".join(filter(None, [PACKAGE, base]))
            # `from ddpm_jax import a, b` imports the modules a and b; `from ddpm_jax.a import f`
            # imports a.
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    graph = {}
    for module in modules:
        with open(os.path.join(PACKAGE_DIR, module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        graph[module] = _imported(tree, modules) - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of `graph`, or None; depth-first with three colours."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_from_imports():
    tree = ast.parse("import os\nfrom ddpm_jax import a, b\n"
                     "def f():\n    from ddpm_jax.c import x\n    import ddpm_jax.d\n")
    assert _imported(tree, {"a", "b", "c", "d", "e"}) == {"a", "b", "c", "d"}


def test_package_imports_are_acyclic():
    graph = import_graph()
    assert len(graph) > 20 and "main" in graph  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_cycle_is_reported_on_a_graph_with_two():
    # Removing one edge of the found cycle and searching again finds the other cycle.
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}
    first = find_cycle(graph)
    graph[first[0]].discard(first[1])
    assert find_cycle(graph) is not None


def test_info_mode_loads_neither_the_trainer_nor_a_module_for_its_error_classes():
    """`--mode=info` (and a mistake in any mode) never needs train.py (CLU, the loop) or the
    modules that only raise errors; main.py itself starts without JAX."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['main', '--config', 'configs/digits.py', '--mode=info']\n"
        "try:\n"
        "    runpy.run_module('ddpm_jax.main', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('ddpm_jax.train', 'ddpm_jax.workdir', 'ddpm_jax.checkpointing',\n"
        "                         'clu') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forward FLOPs per image" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
    started = subprocess.run([sys.executable, "-c", "import sys, ddpm_jax.main; "
                              "print('jax' in sys.modules)"], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert started.stdout.strip() == "False", started.stderr[-3000:]
