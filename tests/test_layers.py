"""The package's layers (docs/architecture.md, "Layers"): no import cycle, no arrow from a lower
layer to a higher one, no module over 500 lines, no class in serve/ with more than 15 attributes.
Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mixllm_jax"
# lowest first; a module may import its own layer and those below it
LAYERS = ["util", "catalog", "data", "core", "text", "store", "offline", "sim", "serve", "cli"]


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports (a `from pkg import mod` counts as mod)."""
    out = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def layer(mod: str) -> int:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "cli"
    return LAYERS.index(top) if top in LAYERS else -1


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m != "mixllm_jax" and layer(m) < 0] == []


def test_no_upward_import():
    up = [(m, d) for m, deps in _graph().items() for d in deps
          if d != "mixllm_jax" and layer(d) > layer(m) and m != "mixllm_jax"]
    assert up == [], f"imports from a lower layer to a higher one: {up}"


def test_no_import_cycle():
    g = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_checker_sees_cycles_and_upward_arrows(tmp_path):
    """The graph code itself: a lazy import inside a function counts."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from mixllm_jax.serve import app\n")
    assert _imports("mixllm_jax.core.x", p, {"mixllm_jax.serve.app", "mixllm_jax.serve"}) == {"mixllm_jax.serve.app"}
    assert layer("mixllm_jax.serve.app") > layer("mixllm_jax.core.x")


def test_modules_are_small():
    big = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert big == {}


def test_serve_classes_are_small():
    """No class in serve/ sets more than 15 attributes on self."""
    fat = {}
    for p in (PKG / "serve").glob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)):
            attrs = {t.attr for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                     for t in ast.walk(t)
                     if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
            fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            if len(attrs | fields) > 15:
                fat[f"{p.name}:{cls.name}"] = len(attrs | fields)
    assert fat == {}
