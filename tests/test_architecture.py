"""The shape of the code: no import cycle between bigbatch's packages, no fault injection in the product,
a scaling rule's settings in one place, a Trainer that stays small."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bigbatch"


def _unit(module: str) -> str:
    """``bigbatch.training.loop`` -> ``bigbatch.training``: a package, or a top-level module."""
    return ".".join(module.split(".")[:2])


def _imports() -> dict[str, set[str]]:
    """Every import of every module, local ones (inside functions) included, as unit -> units."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        unit = _unit(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("bigbatch.") and _unit(name) != unit:
                    graph.setdefault(unit, set()).add(_unit(name))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages():
    graph = _imports()
    assert "bigbatch.training" in graph and "bigbatch.data" in graph["bigbatch.training"]  # the walk sees imports
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and finds a cycle
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _files_with(text: str) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if text in p.read_text())


def test_no_fault_injection_in_the_product():
    assert _files_with("poison") == [] and _files_with("BIGBATCH_INJECT") == []


def test_a_scaling_rule_is_configured_in_one_place():
    """The rule object carries its forms: they appear where the rule is defined, where the config names
    them, and in SVAG's rule at 1 / l, nowhere they would be threaded through."""
    assert len(_files_with("bound_form")) <= 3, _files_with("bound_form")


def test_the_trainer_stays_small():
    tree = ast.parse((PACKAGE / "training" / "loop.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 230
