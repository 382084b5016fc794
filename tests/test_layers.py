"""The package's structure, read from its source (ast, nothing imported): layers that import only downwards,
no import cycles, no package import hidden inside a function, and merge jobs that load neither pandas nor torch."""

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ucpflow"

# Bottom to top: a module may import modules of its own layer or of layers below it, never above.
LAYERS = [
    ["errors", "console", "helptext"],
    ["fileio", "dsconst"],
    ["ptfile"],
    ["tables"],
    ["markers", "smk", "demo", "markdown"],
    ["source"],
    ["stages"],
    ["verify", "export", "reshard", "runs"],
    ["inspect", "config"],
    ["targets", "watch"],
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported ucpflow module, whether the import sits inside a function) for each import of `path`."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            if node.module:  # `from .x import y` may name a submodule y
                targets += [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "ucpflow" and _is_module(target):
                found.append((target, id(node) in inside))
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@functools.cache
def graph() -> dict[str, set[str]]:
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges[module_name(path)] = {target for target, _ in package_imports(path)} - {module_name(path)}
    return edges


def layer(module: str) -> int:
    return LAYER_OF[module.split(".")[1]]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in graph() if m != "ucpflow" and m.split(".")[1] not in LAYER_OF)
    assert not unplaced, f"modules outside LAYERS: {unplaced}"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_run_downwards_only():
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items() if source != "ucpflow"
        for target in targets if target != "ucpflow" and layer(target) > layer(source)
    )
    assert upward == []


def test_ptfile_imports_nothing_of_ucpflow_but_its_error_types():
    outside = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items() if source.startswith("ucpflow.ptfile")
        for target in targets if not target.startswith("ucpflow.ptfile") and target != "ucpflow.errors"
    )
    assert outside == []


def test_no_package_import_inside_a_function():
    """Only heavy optional dependencies (torch, transformers, deepspeed) are imported late; the demo's training
    scripts run under the DeepSpeed launcher and are left out."""
    late = sorted(
        f"{module_name(path)} imports {target}"
        for path in PACKAGE.rglob("*.py") if "demo" not in path.relative_to(PACKAGE).parts
        for target, in_function in package_imports(path) if in_function
    )
    assert late == []


def test_the_layer_check_sees_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("ucpflow.tables") < layer("ucpflow.stages.merge") < layer("ucpflow.inspect")


@pytest.mark.parametrize("module", ["ucpflow.stages.merge", "ucpflow.stages.publish", "ucpflow.smk"])
def test_a_merge_job_imports_neither_pandas_nor_torch(module):
    """What scripts/merge.py imports (and, in Snakemake's process, publish): numpy, not pandas or torch."""
    code = (f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r}); import {module}; "
            "print(sorted(m for m in ('pandas', 'torch', 'deepspeed', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"



def unannotated(source: str) -> list[str]:
    """`function: what lacks a hint` for each public function and public-class method of module text `source`
    missing a parameter (self/cls aside) or return annotation."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions = [(node.name, node, False)]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            functions = [(f"{node.name}.{item.name}", item, True) for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
        else:
            continue
        for name, function, method in functions:
            if name.rsplit(".", 1)[-1].startswith("_"):
                continue
            args = function.args
            positional = args.posonlyargs + args.args
            if method and positional and positional[0].arg in ("self", "cls"):
                positional = positional[1:]
            params = [a for a in positional + args.kwonlyargs + [args.vararg, args.kwarg] if a is not None]
            missing = [a.arg for a in params if a.annotation is None] + (["return"] if function.returns is None else [])
            if missing:
                found.append(f"{name}: {', '.join(missing)}")
    return found


def test_public_functions_have_complete_type_hints():
    """Every public function and public-class method outside the demo annotates each parameter and its return."""
    missing = [f"{module_name(path)}.{entry}" for path in sorted(PACKAGE.rglob("*.py"))
               if "demo" not in path.relative_to(PACKAGE).parts for entry in unannotated(path.read_text())]
    assert missing == [], f"{len(missing)} without complete type hints:\n" + "\n".join(missing)


def test_the_type_hint_check_sees_a_missing_hint():
    source = ("def f(a: int, b) -> int: ...\ndef g(*, a: int): ...\ndef _h(a): ...\n"
              "class C:\n    def m(self, x: int) -> None: ...\n    def n(self, *args, **kw: int) -> None: ...\n"
              "    @classmethod\n    def k(cls) -> None: ...\n    def _p(self, y): ...\n"
              "class _D:\n    def q(self, z): ...\n")
    assert unannotated(source) == ["f: b", "g: return", "C.n: args"]
