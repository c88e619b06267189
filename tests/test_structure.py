"""The layout's rules (docs/ARCHITECTURE.md): no import circle, dependencies one way, small modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "textinv"
MAX_MODULE_LINES = 450
MAX_LOOP_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """textinv modules ``name`` imports anywhere in its file (inside functions too), as module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # `from textinv.x import y`: y may be a module or a name in module x.
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            # A module importing its own package (or the root package's API) is not a dependency edge.
            if candidate and candidate != name and not name.startswith(candidate + "."):
                found.add(candidate)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import path that leads back to where it started (depth-first search, one per circle found)."""
    found, done, stack = [], set(), []

    def visit(node: str) -> None:
        if node in stack:
            found.append(stack[stack.index(node) :] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_the_import_graph_has_no_circle() -> None:
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c", "a"]]


def test_dependencies_point_one_way() -> None:
    graph = _graph()
    assert graph["textinv.events"] == set(), "events must import nothing of textinv"
    assert graph["textinv.errors"] == set(), "errors must import nothing of textinv"
    assert graph["textinv.fields"] == set(), "fields must import nothing of textinv"
    # docs/ARCHITECTURE.md's dependency rule names what config may import; the graph holds exactly those.
    architecture = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    sentence = re.search(r"`config` only (.*?) \(and not torch", architecture, re.S)
    assert sentence, "docs/ARCHITECTURE.md no longer says what config imports"
    documented = {f"textinv.{name}" for name in re.findall(r"`([\w.]+)`", sentence.group(1))}
    assert graph["textinv.config"] == documented, (graph["textinv.config"], documented)
    assert graph["textinv.loss_options"] <= {"textinv.errors", "textinv.fields"}
    assert graph["textinv.lora_options"] <= {"textinv.errors", "textinv.fields"}
    assert graph["textinv.optimizer_options"] <= {"textinv.errors", "textinv.fields"}
    assert graph["textinv.held_out_options"] <= {"textinv.errors", "textinv.fields"}
    assert graph["textinv.data.options"] <= {
        "textinv.errors",
        "textinv.fields",
        "textinv.data.buckets",
        "textinv.text_files",
    }
    assert graph["textinv.text_files"] <= {"textinv.errors"}
    importers_of_cli = sorted(name for name, deps in graph.items() if "textinv.cli" in deps)
    assert importers_of_cli == []
    training = {name for name in graph if name.startswith("textinv.training")}
    reaches_observers = sorted(n for n in training if any(d.startswith("textinv.observers") for d in graph[n]))
    assert reaches_observers == [], "training must not import observers: its callers pass them"
    models = {name for name in graph if name.startswith("textinv.models")}
    assert not any(d.startswith("textinv.embeddings") for n in models for d in graph[n])


@pytest.mark.parametrize(
    "module",
    [
        "config.py",
        "fields.py",
        "data/options.py",
        "data/buckets.py",
        "loss_options.py",
        "lora_options.py",
        "optimizer_options.py",
        "held_out_options.py",
        "text_files.py",
        "data/concepts.py",
    ],
)
def test_config_does_not_import_torch(module: str) -> None:
    # The CLI validates a config (data options included) before paying for torch's import.
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"torch", "numpy", "PIL"}


def test_every_module_is_small_enough_to_hold_in_mind() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


def test_the_training_loop_fits_on_one_screen() -> None:
    tree = ast.parse((PACKAGE / "training" / "recipe.py").read_text(encoding="utf-8"))
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    for name in ("train", "loop"):
        node = functions[name]
        assert node.end_lineno is not None
        assert node.end_lineno - node.lineno + 1 < MAX_LOOP_LINES, name
