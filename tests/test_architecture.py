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
LAYERS = [("config", "progress", "cli"), ("core",), ("formats", "comm"), ("placements",), ("registry",), ("inject", "merge"),
          ("io",), ("training", "integrations"), ("commands", "experiments")]
#: optional third-party packages that kasa_ds may import inside a function (only where a model uses them)
OPTIONAL = ("deepspeed", "bitsandbytes", "megatron", "transformers", "peft", "torch.utils.tensorboard", "datasets", "accelerate", "gguf", "mpi4py", "matplotlib", "scipy")
MAX_FUNCTION_LINES = 60
#: the layers that know no concrete placement: they ask a layer's placement (recorded at injection) or the registry
PLACEMENT_FREE = ("core", "formats", "comm", "inject", "merge", "io")
#: what a second placement dispatch looks like: a concrete placement imported, or a placement's storage tested
DISPATCH_MARKS = ("ds_tensor", "ds_id", "ds_shape", "ds_numel", "is_partitioned", "tp_layers", "KaSAParallelLinear", "ShardSpec")


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


def long_functions(paths) -> list[str]:
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    return long


def code_files():
    """The package, the launchers and the tools: every file the 60-line rule holds."""
    return list(PACKAGE.rglob("*.py")) + list((REPO / "launch").rglob("*.py")) + list((REPO / "tools").glob("*.py"))


def test_functions_are_short_and_the_entry_point_thin():
    long = long_functions(code_files())
    assert not long, long
    assert len((REPO / "launch/train.py").read_text().splitlines()) <= 150


def test_the_function_length_rule_can_fail():
    planted = REPO / "tools" / "_planted_long_for_test.py"
    planted.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    try:
        assert any("_planted_long_for_test.py:1 f (61 lines)" in p for p in long_functions(code_files()))
    finally:
        planted.unlink()


def tool_problems() -> list[str]:
    """A tool imports kasa_ds and nothing of launch/ or of another tool (each tool is a thin command)."""
    tools = {p.stem for p in (REPO / "tools").glob("*.py")}
    problems = []
    for path in (REPO / "tools").glob("*.py"):
        text = path.read_text()
        for target, line, _ in imports(path):
            if target.split(".")[0] == "launch" or target.split(".")[0] in tools - {path.stem}:
                problems.append(f"tools/{path.name}:{line} imports {target}")
        if "sys.path" in text or ("launch/train.py" in text and "spec_from_file_location" in text):
            problems.append(f"tools/{path.name}: reaches other files through sys.path or by file location")
    return problems


def test_tools_import_kasa_ds_never_launch_or_another_tool():
    assert not tool_problems(), tool_problems()


def test_the_tool_rule_can_fail():
    planted = REPO / "tools" / "_planted_tool_for_test.py"
    planted.write_text("from bench_step import main\n")
    try:
        assert any("_planted_tool_for_test.py:1 imports bench_step" in p for p in tool_problems())
    finally:
        planted.unlink()


def identifiers(path: Path) -> set[str]:
    """Names, attributes and string constants in the code (docstrings and comments are not code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "getattr"):
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return found


def dispatch_problems() -> list[str]:
    """Code outside the registry and the placements that picks a placement itself (a second dispatch)."""
    problems = []
    for path in PACKAGE.rglob("*.py"):
        me = module_name(path)
        if me.split(".")[1:2] and me.split(".")[1] not in PLACEMENT_FREE:
            continue
        for target, line, _ in imports(path):
            if target.startswith("kasa_ds.placements.") and not target.startswith("kasa_ds.placements.base"):
                problems.append(f"{path.relative_to(REPO)}:{line} imports the concrete placement {target}")
        used = identifiers(path)
        problems += [f"{path.relative_to(REPO)} tests a placement's storage ({mark})" for mark in DISPATCH_MARKS
                     if mark in used]
    return problems


def test_one_placement_dispatch():
    assert not dispatch_problems(), dispatch_problems()


def test_a_second_placement_dispatch_in_io_is_caught():
    planted = PACKAGE / "io" / "_planted_dispatch_for_test.py"
    planted.write_text('"""planted"""\nfrom ..placements.zero3 import ZERO3\n\n\ndef f(p):\n'
                       '    return ZERO3 if hasattr(p, "ds_tensor") else None\n')
    try:
        problems = dispatch_problems()
    finally:
        planted.unlink()
    assert any("_planted_dispatch_for_test.py:2 imports the concrete placement kasa_ds.placements.zero3" in p
               for p in problems)
    assert any("_planted_dispatch_for_test.py tests a placement's storage (ds_tensor)" in p for p in problems)


OLD_PATHS = ["adapter_io", "assets", "dist", "dist.comm", "dist.schedule", "dist.mappings", "checkpoint", "data", "hf_checkpoint", "layer", "memory_plan", "metrics",
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
        from kasa_ds.comm.schedule import assign_owners

        assert module.plan is assign_owners
