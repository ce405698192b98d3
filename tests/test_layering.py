"""cvt_fast is built in layers that only import downward, read from the source (every import statement, those inside
functions included): a module may import from its own layer or the layers below, never above, and no modules import
each other in a circle. The kernels are a leaf: they import nothing of cvt_fast outside cvt_fast.kernels.

The table is the architecture in short; a new module needs a row."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# Bottom first. A pattern names a module or, with ".*", every module of a package.
LAYERS = [
    (
        "leaves",
        [
            "cvt_fast.errors",
            "cvt_fast.files",
            "cvt_fast.hub",
            "cvt_fast.testing",
            "cvt_fast.timing",
            "cvt_fast.version",
        ],
    ),
    ("config", ["cvt_fast.config"]),
    ("kernels", ["cvt_fast.kernels", "cvt_fast.kernels.*"]),
    ("ops", ["cvt_fast.ops", "cvt_fast.ops.*"]),
    (
        "models",
        [
            "cvt_fast.checks",
            "cvt_fast.outputs",
            "cvt_fast.checkpointing",
            "cvt_fast.loading",
            "cvt_fast.original",
            "cvt_fast.modeling",
            "cvt_fast.backbone",
            "cvt_fast.image_processing",
        ],
    ),
    (
        "interop",
        [
            "cvt_fast.patching",
            "cvt_fast.export",
            "cvt_fast.integrations",
            "cvt_fast.cpu_target",
            "cvt_fast.frozen",
            "cvt_fast.frozen.*",
        ],
    ),
    (
        "tools",
        ["cvt_fast.tools", "cvt_fast.tools.*"],
    ),
    ("cli", ["cvt_fast.cli.*", "cvt_fast.__main__"]),
]
PUBLIC_FACE = "cvt_fast"  # the package's __init__: it names everything public, lazily, from the top
LEAF_PACKAGES = ["cvt_fast.kernels"]


def source_modules() -> dict[str, Path]:
    """{module name: file} for cvt_fast/ and for kernels/, which ships as cvt_fast.kernels."""
    modules = {}
    for package, folder in (("cvt_fast", ROOT / "cvt_fast"), ("cvt_fast.kernels", ROOT / "kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The cvt_fast modules that `name` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import cvt_fast.ops.cpu as x` names a module; keep the longest
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) or module == p.removesuffix(".*") for p in patterns):
            return index
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        if module == PUBLIC_FACE:
            continue
        layer = layer_of(module)
        for target in sorted(targets):
            if target == PUBLIC_FACE:
                found.append(f"{module} imports the package root, which imports everything")
                continue
            target_layer = layer_of(target)
            if layer is not None and target_layer is not None and target_layer > layer:
                found.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]}), above it")
            for leaf in LEAF_PACKAGES:
                if module.startswith(leaf) and not target.startswith(leaf):
                    found.append(f"{module} is in the leaf package {leaf} but imports {target}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Circles of imports (Tarjan's strongly connected components with more than one module)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    # A package's own __init__ re-exporting its modules is not a circle with them: count only what a module needs.
    graph = {name: imports_of(name, path, known) for name, path in modules.items()}
    for name, targets in graph.items():
        graph[name] = {
            t for t in targets
            if not (name.startswith(t + ".") and modules[name].name != "__init__.py" and t != PUBLIC_FACE)
        }  # fmt: skip
    return graph


def test_every_module_has_a_layer():
    unplaced = [m for m in source_modules() if m != PUBLIC_FACE and layer_of(m) is None]
    assert not unplaced, f"modules without a layer in tests/test_layering.py: {unplaced}"


def test_imports_point_down():
    assert not violations(import_graph())


def test_no_module_imports_in_a_circle():
    assert not cycles(import_graph())


def test_the_checks_catch_a_planted_upward_import_and_a_circle():
    """The checks above, on a planted graph: config importing loading (models) is upward and makes a circle (loading
    imports config), and the kernels importing ops leave the leaf."""
    graph = import_graph()
    graph["cvt_fast.config"] = graph["cvt_fast.config"] | {"cvt_fast.loading"}
    graph["cvt_fast.kernels.attention"] = graph["cvt_fast.kernels.attention"] | {"cvt_fast.ops.dispatch"}
    found = violations(graph)
    assert any(v.startswith("cvt_fast.config (config) imports cvt_fast.loading (models)") for v in found), found
    assert any("cvt_fast.kernels.attention is in the leaf package" in v for v in found), found
    assert any({"cvt_fast.config", "cvt_fast.loading"} <= set(c) for c in cycles(graph))  # loading imports config


def test_the_parser_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text("def f():\n    from .loading import from_pretrained\n    from ..errors import UserError\n")
    known = {"cvt_fast.ops.loading", "cvt_fast.errors", "cvt_fast.ops"}
    assert imports_of("cvt_fast.ops.mod", module, known) == {"cvt_fast.ops.loading", "cvt_fast.errors"}
