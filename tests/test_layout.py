"""The package's shape: imports run one way along the pipeline, and every module is on the map."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lmshrink"
# each wing may import itself and any wing later in this list; top-level modules are the core
ORDER = ["recipes", "heal", "compress", "export", "evaluate", "data", "core"]


def modules() -> dict[str, Path]:
    """Dotted name under lmshrink -> file, for every module but the empty package markers."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))
            if p.name != "__init__.py"}


def wing(name: str) -> str:
    head = name.split(".")[0]
    return head if head in ORDER else "core"


def imported(path: Path) -> set[str]:
    """The lmshrink modules a file imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmshrink":
            inner = node.module.split(".", 1)[1] if "." in node.module else ""
            found |= {f"{inner}.{a.name}".strip(".") for a in node.names} if inner in ("", *ORDER) else {inner}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("lmshrink.")}
    return {name for name in found if name and name != "__version__"}


def test_imports_run_one_way_along_the_pipeline():
    wrong = [f"{name} imports {other}" for name, path in modules().items() for other in imported(path)
             if ORDER.index(wing(other)) < ORDER.index(wing(name))]
    assert wrong == []


def test_the_check_catches_an_import_against_the_grain(tmp_path):
    backwards = tmp_path / "x.py"
    backwards.write_text("def f():\n    from lmshrink.heal.training import train\n")
    assert imported(backwards) == {"heal.training"} and ORDER.index("heal") < ORDER.index("data")


def test_every_module_is_on_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text()
    # recipes are listed by file name in the page's table of recipes
    listed = {name: name.rsplit(".", 1)[-1] if wing(name) == "recipes" else name.replace(".", "/") for name in modules()}
    missing = [name for name, shown in listed.items() if f"`{shown}.py`" not in page]
    assert missing == []


def test_no_module_imports_itself_round_about():
    """No cycles, not even through imports inside functions (they hide one until it bites)."""
    graph = {name: {other for other in imported(path) if other in modules()} for name, path in modules().items()}
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        for other in sorted(graph[name]):
            if other in path:
                cycles.append(" -> ".join([*path[path.index(other):], other]))
            elif other not in done:
                visit(other, [*path, other])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def recipe_internals(path: Path) -> list[str]:
    """What a file takes from a recipe besides its public face: the command's Settings class and `run`."""
    taken = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmshrink.recipes."):
            taken += [f"{node.module}.{a.name}" for a in node.names if not (a.name == "run" or a.name.endswith("Settings"))]
    return taken


def test_no_recipe_or_bench_reaches_into_another_recipe():
    """Recipes compose each other through their settings and `run`; library code lives in the wings, so
    a bench or another recipe never imports a recipe's helpers."""
    files = [*sorted((PACKAGE / "recipes").glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    assert [f"{path.name}: {name}" for path in files for name in recipe_internals(path)] == []


def test_the_recipe_check_catches_a_helper(tmp_path):
    reaching = tmp_path / "y.py"
    reaching.write_text("from lmshrink.recipes.evaluate import EvalSettings, evaluate_model\n")
    assert recipe_internals(reaching) == ["lmshrink.recipes.evaluate.evaluate_model"]
