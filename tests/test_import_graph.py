"""The package's import graph is acyclic and needs no function-local imports to stay so.

Data flows down: e.g. ``drafts.registry`` imports the families, the families import only
shared pieces, ``checkpoint`` knows no family. A cycle is latent even when today's import
order happens to work (``deepspec_jax/__init__`` always runs first): whichever module of
the cycle is imported first sees another half-initialised. The check is static (no
imports, ~1 s): an edge ``a -> b`` for every import ``a`` executes when it is imported
(module level, including ``if``/``try`` blocks and class bodies; not function bodies),
plus ``a -> p`` for every package ``p`` above ``b`` that is not above ``a`` (importing
``p.x`` runs ``p/__init__`` first). One subprocess then imports every module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGES = ("deepspec_jax", "convert")

# Function-local imports of the package's own modules that are allowed: none. A new
# local import fails the test (import at module level; if that makes a cycle, move code
# down a layer).
ALLOWED_LOCAL: set[tuple[str, str]] = set()


def package_modules(root: str) -> dict[str, str]:
    """{dotted module name: file} of every module of ``PACKAGES`` under ``root``."""
    mods = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(node: ast.AST, mod: str, is_pkg: bool, mods: dict) -> list[str]:
    """The package modules an import statement imports (``from x import y``: x.y if that is
    a module, else x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against the importing package
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in mods else base)
    return [t for t in out if t in mods]


def _import_time_nodes(body):
    """Statements executed at import: recurse into if/try/with/class, not into functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _import_time_nodes(getattr(node, field, []) or [])


def import_graph(root: str):
    """(edges {module: set of modules it needs at import}, function-local imports
    [(module, imported module)])."""
    mods = package_modules(root)
    edges, local = {m: set() for m in mods}, []
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_pkg = path.endswith("__init__.py")
        at_import = set()
        for node in _import_time_nodes(tree.body):
            at_import.add(id(node))
            for t in _targets(node, mod, is_pkg, mods):
                edges[mod].add(t)
                edges[mod].update(a for a in _ancestors(t) if a not in _ancestors(mod) and a != mod)
        for node in ast.walk(tree):
            if id(node) not in at_import:
                local += [(mod, t) for t in _targets(node, mod, is_pkg, mods)]
    return edges, local


def find_cycle(edges: dict[str, set]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative DFS)."""
    state: dict[str, int] = {}            # 1 = on the stack, 2 = done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(edges.get(nxt, ())))))
                path.append(nxt)
    return None


def test_package_import_graph_is_acyclic():
    edges, _ = import_graph(REPO)
    assert len(edges) > 50
    assert edges["deepspec_jax.drafts.registry"] >= {"deepspec_jax.drafts.dspark",
                                                     "deepspec_jax.drafts.eagle3"}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_new_function_local_imports():
    _, local = import_graph(REPO)
    new = sorted(set(local) - ALLOWED_LOCAL)
    assert not new, ("function-local imports of the package's own modules (import them at "
                     f"module level; if that makes a cycle, move code down a layer): {new}")


def _write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def test_checker_finds_cycles_through_package_inits(tmp_path):
    """The checker's own test: a package __init__ that imports a module which imports a
    sibling of that package is a cycle (the shape ``drafts/__init__ -> checkpoint ->
    drafts.registry`` had); the same modules without the back edge are not."""
    files = {
        "deepspec_jax/__init__.py": "",
        "deepspec_jax/checkpoint.py": "import os\n",
        "deepspec_jax/drafts/__init__.py": "from deepspec_jax.checkpoint import os\n",
        "deepspec_jax/drafts/registry.py": "from deepspec_jax.drafts import dspark\n",
        "deepspec_jax/drafts/dspark.py": "def f():\n    from deepspec_jax import checkpoint\n",
    }
    _write(tmp_path, files)
    edges, local = import_graph(str(tmp_path))
    assert find_cycle(edges) is None
    assert local == [("deepspec_jax.drafts.dspark", "deepspec_jax.checkpoint")]
    _write(tmp_path, {"deepspec_jax/checkpoint.py":
                      "try:\n    from deepspec_jax.drafts.registry import dspark\n"
                      "except ImportError:\n    pass\n"})
    edges, _ = import_graph(str(tmp_path))
    assert find_cycle(edges) == ["deepspec_jax.checkpoint", "deepspec_jax.drafts",
                                 "deepspec_jax.checkpoint"]


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imports (in sorted order, one interpreter: ~15 s)."""
    mods = sorted(m for m in package_modules(REPO) if not m.endswith("__main__"))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *mods], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
