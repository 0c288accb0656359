"""The layout keeps its floors: no import circles, no arrow from the engine up to the methods or to
the layers, layers that import nothing above them, no method named above ``methods/`` (the
experiment, the CLI, the reports and the RL comparison know methods only through the registry), and
an engine that names no method or layer (methods reach it through its hooks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from zootune.methods.registry import available_methods

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "zootune"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """module -> the zootune modules it imports (at module level or inside functions: both count)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("zootune"):
                targets = [resolve(f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names if alias.name.startswith("zootune")]
            graph[name].update(t for t in targets if t and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_import_graph()) == []


# Below every floor: modules that import nothing of zootune (errors, atomic file writes).
BASEMENT = ("zootune.errors", "zootune.atomic")


def test_the_basement_imports_nothing_of_zootune():
    graph = _import_graph()
    assert {name: graph[name] for name in BASEMENT} == {name: set() for name in BASEMENT}


def test_no_arrow_up_from_the_lower_floors():
    graph = _import_graph()
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if (a.startswith("zootune.engine")
                  and b.startswith(("zootune.methods", "zootune.experiment", "zootune.cli", "zootune.layers")))
              or (a.startswith("zootune.layers") and not b.startswith(("zootune.layers", *BASEMENT)))]
    assert upward == []


# What the engine's source may not name: a layer class or a method's concern. The exceptions are the
# names older checkpoints and configs used, which the engine still reads (each on one assignment line).
ENGINE_NEVER_NAMES = ("AggregatedLayer", "formulation", "zoo-tuning", "zoo_tuning", "hub-pathway", "hub_pathway",
                      "zootune.layers")
OLDER_NAMES = {("hooks.py", "OLDER_TRAINING_STATES_KEY"), ("config.py", "_RENAMED_OPTIONS")}


def _engine_mentions(files: list[Path]) -> list[str]:
    """``file:line: text`` for every line of ``files`` naming what the engine may not name."""
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if any(line.startswith(f"{name} = ") for file, name in OLDER_NAMES if path.name == file):
                continue
            if any(word.lower() in line.lower() for word in ENGINE_NEVER_NAMES):
                found.append(f"{path.name}:{number}: {line.strip()}")
    return found


def test_the_engine_names_no_method_or_layer():
    files = sorted((PACKAGE / "engine").glob("*.py"))
    assert PACKAGE / "engine" / "hooks.py" in files
    assert _engine_mentions(files) == []


def test_a_layer_planted_in_the_engine_is_found(tmp_path):
    planted = tmp_path / "trainer.py"
    planted.write_text('from zootune.layers import AggregatedLayer\n_RENAMED_OPTIONS = {"formulations": "x"}\n')
    assert _engine_mentions([planted]) == [
        "trainer.py:1: from zootune.layers import AggregatedLayer",
        'trainer.py:2: _RENAMED_OPTIONS = {"formulations": "x"}',  # only config.py's is an exception
    ]


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String constants of a file that are not docstrings (f-string parts included)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


# The files that must know methods only through the registry: every file outside methods/.
ABOVE_METHODS = ("*.py", "cli/*.py", "report/*.py", "rl/*.py", "engine/*.py", "data/*.py", "tasks/*.py")


def _method_names_in(files: list[Path], root: Path = PACKAGE) -> list[str]:
    """``path:line: [names] in 'text'`` for every registered method name in the files' strings."""
    names = set(available_methods())
    found = []
    for path in files:
        for line, text in _string_constants(path):
            tokens = set(re.split(r"[^a-z0-9_-]+", text.lower()))  # identifiers (finetune_each) stay whole
            hits = names & tokens
            if hits:
                found.append(f"{path.relative_to(root)}:{line}: {sorted(hits)} in {text!r}")
    return found


def test_no_method_name_above_methods():
    files = sorted(path for pattern in ABOVE_METHODS for path in PACKAGE.glob(pattern))
    assert PACKAGE / "rl" / "transfer.py" in files and PACKAGE / "fitting.py" in files
    assert _method_names_in(files) == []


def test_a_method_name_planted_in_rl_is_found(tmp_path):
    planted = tmp_path / "rl" / "transfer.py"
    planted.parent.mkdir()
    planted.write_text('def build(method):\n    if method == "lite":\n        return 1\n')
    assert _method_names_in([planted], root=tmp_path) == ["rl/transfer.py:2: ['lite'] in 'lite'"]


# The longest a library function may be (def line to last line): a unit a reader holds in mind.
MAX_FUNCTION_LINES = 60


def _long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_library_function_is_longer_than_60_lines():
    assert _long_functions(PACKAGE) == []


def test_a_planted_long_function_is_found(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}")
    assert _long_functions(tmp_path) == [f"long.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
