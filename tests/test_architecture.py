"""The checkable rules of docs/architecture.md: module size, import cycles, what may import what.

Static (the `ast` of every module under sketchcomp_jax/), except the last test, which imports the grain
worker's module in a fresh process.
"""
import ast
import functools
import pathlib
import subprocess
import sys

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "sketchcomp_jax"
MAX_LINES = 600
CORE = ("models", "ops", "diffusion")
CORE_MAY_NOT_IMPORT = ("data", "weights", "train", "eval", "app", "pipeline", "generation", "model_source")
HEAVY_PYTORCH_SIDE = ("torch", "diffusers", "transformers", "gradio", "playwright")
# Lazy (function-level) cycles that are known and tracked (none: `pipeline` imports `model_source`, not the reverse).
KNOWN_LAZY_CYCLES: list[set[str]] = []


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


@functools.lru_cache(maxsize=None)
def _imports(path: pathlib.Path, module_level_only: bool) -> list[tuple[str, bool]]:
    """(imported module name, at module level?) for every import statement in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not module_level_only or id(node) in top:
                out.append((name, id(node) in top))
    return out


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for name, _ in _imports(path, module_level_only):
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != mod and name != "sketchcomp_jax":
                graph[mod].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (one job each): {long}"


def test_no_import_cycles():
    assert _cycles(_graph(module_level_only=True)) == []
    unknown = [c for c in _cycles(_graph(module_level_only=False)) if c not in KNOWN_LAZY_CYCLES]
    assert not unknown, unknown


def test_core_imports_no_outer_layer():
    for mod, path in MODULES.items():
        if mod.split(".")[1:2] not in [[c] for c in CORE]:
            continue
        for name, _ in _imports(path, module_level_only=False):
            parts = name.split(".")
            assert not (parts[0] == "sketchcomp_jax" and len(parts) > 1 and parts[1] in CORE_MAY_NOT_IMPORT), (mod, name)


def test_pytorch_side_is_never_imported_at_module_level():
    for mod, path in MODULES.items():
        for name, top in _imports(path, module_level_only=False):
            if name.split(".")[0] in HEAVY_PYTORCH_SIDE:
                assert not top, f"{mod} imports {name} at module level (the main install has no {name})"
                allowed = {"torch": "weights", "gradio": "app"}.get(name.split(".")[0])
                assert mod.split(".")[1:2] == [allowed], f"only weights/ may import torch, only app/ gradio: {mod}, {name}"


def test_grain_worker_module_loads_no_flax_nor_torch():
    code = ("import sys, sketchcomp_jax.data.pipeline; "
            "print(sorted(m for m in ('flax', 'torch', 'sketchcomp_jax.models.unet') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
