"""The package's shape: one-way layers with no import cycle, no kasa_ds import hidden in a function, short functions,
tools that import kasa_ds only, and the old 0.1 import paths still serving their names (for one release)."""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kasa_ds"
#: each layer may import only from itself and the layers before it (kasa_ds/__init__ and compat stand above all)
LAYERS = [("config", "progress", "cli"), ("core",), ("formats", "dist"), ("placements",), ("registry",), ("inject", "merge"),
          ("io",), ("training", "integrations")]
#: optional third-party packages that kasa_ds may import inside a function (only where a model uses them)
OPTIONAL = ("deepspeed", "bitsandbytes", "megatron", "transformers", "peft", "torch.utils.tensorboard", "datasets", "accelerate")
MAX_FUNCTION_LINES = 90


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, line, inside a function) for every import statement, relative ones made absolute."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                names = [f"{base}.{a.name}" for a in child.names] if not child.module else [base]
                found.extend((n, child.lineno, in_function) for n in names)
            visit(child, nested)

    visit(tree, False)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return next(i for i, names in enumerate(LAYERS) if top in names)


def package_graph():
    graph, problems = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        graph[me] = set()
        for target, line, in_function in imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            if target.split(".")[0] != "kasa_ds":
                if in_function and not target.startswith(OPTIONAL):
                    problems.append(f"{where}: {target} imported inside a function (only optional packages may be)")
                continue
            if in_function:
                problems.append(f"{where}: kasa_ds import hidden inside a function ({target})")
            if me in ("kasa_ds", "kasa_ds.compat"):
                continue
            if target != "kasa_ds" and layer_of(target) > layer_of(me):
                problems.append(f"{where}: upward import {me} → {target}")
            if target == "kasa_ds":
                problems.append(f"{where}: {me} imports the package root (import the defining module)")
            resolved = target if (REPO / (target.replace(".", "/") + ".py")).is_file() or \
                (REPO / target.replace(".", "/") / "__init__.py").is_file() else target.rpartition(".")[0]
            graph[me].add(resolved)
    return graph, problems


def test_layers_point_one_way_and_nothing_hides_in_functions():
    _, problems = package_graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    graph, _ = package_graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " → ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_walker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward, hidden import is reported."""
    bad = PACKAGE / "core" / "_planted_for_test.py"
    bad.write_text("def f():\n    from ..training import recipe\n")
    try:
        _, problems = package_graph()
    finally:
        bad.unlink()
    assert any("_planted_for_test.py:2" in p and "hidden inside a function" in p for p in problems)
    assert any("upward import kasa_ds.core._planted_for_test → kasa_ds.training" in p for p in problems)


def test_every_module_says_what_it_holds():
    missing = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def test_functions_are_short_and_the_entry_point_thin():
    long = []
    for path in list(PACKAGE.rglob("*.py")) + list((REPO / "launch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
    assert len((REPO / "launch/train.py").read_text().splitlines()) <= 150


def test_tools_import_kasa_ds_never_launch():
    for path in (REPO / "tools").glob("*.py"):
        text = path.read_text()
        targets = [t for t, _, _ in imports(path)]
        assert not [t for t in targets if t.split(".")[0] == "launch"], path
        assert "launch/train.py" not in text or "spec_from_file_location" not in text, path


OLD_PATHS = ["adapter_io", "assets", "checkpoint", "data", "hf_checkpoint", "layer", "memory_plan", "metrics",
             "models", "preemption", "quant", "regularization", "single_device", "svd_cache", "tp_integrations",
             "tp_layer", "tp_shard", "train_config", "truncation", "utils", "zero"]


@pytest.mark.parametrize("old", OLD_PATHS)
def test_old_import_paths_still_serve_their_names(old):
    from kasa_ds import compat

    sys.modules.pop(f"kasa_ds.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"kasa_ds.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and f"kasa_ds.{old} moved" in str(w.message)
               for w in caught)
    for name in compat._MOVED[old]:
        assert getattr(module, name) is compat.resolve(old, name)
    # e.g. the old `from kasa_ds.zero import plan` is the new owner schedule
    if old == "zero":
        from kasa_ds.dist.schedule import assign_owners

        assert module.plan is assign_owners
