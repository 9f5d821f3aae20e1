"""The shape of the code (issue 8): small modules, short functions.

No module of ``sweeper/`` or ``trainer/`` is over :data:`MAX_MODULE_LINES` lines, and no function
(or method) over :data:`MAX_FUNCTION_LINES`, measured with ``ast`` from its ``def`` (decorators
excluded) to its last line, docstring included. The one exception is the training loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sweeper", "trainer")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
# The training loop reads best in one piece: forward, backward, logging, checkpoints, stops.
EXEMPT_FUNCTIONS = {"trainer/train.py::Trainer.run"}


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def long_functions(path: Path) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function of ``path`` over the limit."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                n = (child.end_lineno or child.lineno) - child.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append((name, n))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def test_the_rule_measures_what_it_says(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    src = tmp_path / "m.py"
    src.write_text(f"class A:\n    def f(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n")
    assert long_functions(src) == [("A.f", MAX_FUNCTION_LINES + 1)]
    src.write_text(f"def g():\n{body[: body.rindex(chr(10))]}\n")
    assert long_functions(src) == []


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_is_small(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(REPO)}: {n} lines (> {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_are_short(path: Path) -> None:
    rel = path.relative_to(REPO).as_posix()
    long = [(f, n) for f, n in long_functions(path) if f"{rel}::{f}" not in EXEMPT_FUNCTIONS]
    assert not long, f"{rel}: " + ", ".join(f"{f} ({n} lines)" for f, n in long)
