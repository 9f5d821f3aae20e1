"""The one-way import rules of the layout (docs/architecture.md), checked on the source.

Each rule reads the imports of every module with ``ast`` (top-level and function-level imports
alike), so a lazy import cannot hide a dependency the layout forbids.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement of ``path`` (absolute names only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _offenders(
    package: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()
) -> list[str]:
    bad = []
    for path in _modules(package):
        for name in sorted(_imports(path)):
            hit = any(name == f or name.startswith(f + ".") for f in forbidden)
            ok = any(name == a or name.startswith(a + ".") for a in allowed)
            if hit and not ok:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_the_trainer_never_imports_the_sweeper() -> None:
    assert _offenders("trainer", ("sweeper",)) == []


def test_only_the_cli_imports_click() -> None:
    bad = [b for b in _offenders("sweeper", ("click",)) if not b.startswith("sweeper/cli/")]
    assert bad == []


def test_the_analysis_reads_tables_and_never_the_store_or_the_runs() -> None:
    forbidden = (
        "sweeper.store",
        "sweeper.store_read",
        "sweeper.collect",
        "sweeper.backends",
        "sweeper.worker",
        "sweeper.sweep",
        "sweeper.cli",
        "click",
    )
    assert _offenders("sweeper/analysis", forbidden) == []


@pytest.mark.parametrize("module", ["store.py", "store_read.py", "records.py", "fsutil.py"])
def test_the_store_imports_nothing_above_it(module: str) -> None:
    allowed = ("sweeper.errors", "sweeper.fsutil", "sweeper.records", "sweeper.store_read")
    names = {n for n in _imports(REPO / "sweeper" / module) if n.startswith("sweeper")}
    assert {n for n in names if not any(n == a or n.startswith(a + ".") for a in allowed)} == set()


def test_the_cli_uses_only_the_public_api() -> None:
    bad = [
        b
        for b in _offenders("sweeper/cli", ("sweeper",), allowed=("sweeper.cli",))
        # `from sweeper import X` names the public API (sweeper.__all__)
        if b.split(" imports ")[1].rsplit(".", 1)[0] != "sweeper"
    ]
    assert bad == []


def test_spec_and_plan_never_import_a_backend_module() -> None:
    bad = []
    for module in ("spec.py", "spec_checks.py", "spec_settings.py", "spec_values.py", "plan.py"):
        for name in _imports(REPO / "sweeper" / module):
            if name.startswith("sweeper.backends.") and name.count(".") >= 2:
                if name.split(".")[2] in {"local", "slurm", "slurm_script", "ray", "sim"}:
                    bad.append(f"sweeper/{module} imports {name}")
    assert bad == []


def test_planning_on_a_login_node_needs_no_torch_and_no_cluster_library() -> None:
    code = (
        "import sys, sweeper\n"
        "spec = sweeper.load_spec('sweeps/demo.toml')\n"
        "runs = sweeper.plan(spec)\n"
        "assert runs\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'submitit', 'click') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
