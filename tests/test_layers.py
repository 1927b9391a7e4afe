"""Layer rules that import contracts cannot state (those are in pyproject.toml,
[tool.importlinter], checked by `lint-imports` in `make lint`)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "node_agent"
EXITS: set[tuple[str | None, str]] = {
    ("sys", "exit"),
    ("os", "_exit"),
    (None, "exit"),
    (None, "quit"),
}


def exits_in(path: Path) -> list[str]:
    """`sys.exit(...)`, `os._exit(...)`, `exit(...)`, `quit(...)` and `raise SystemExit`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        called: tuple[str | None, str]
        if isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
                called = (function.value.id, function.attr)
            elif isinstance(function, ast.Name):
                called = (None, function.id)
            else:
                continue
            if called in EXITS:
                found.append((node.lineno, path.name))
        elif isinstance(node, ast.Raise) and node.exc is not None:
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(raised, ast.Name) and raised.id == "SystemExit":
                found.append((node.lineno, path.name))
    return [f"{name}:{line}" for line, name in sorted(found)]


def test_only_main_exits() -> None:
    modules = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__main__.py"]
    assert [place for path in modules for place in exits_in(path)] == []
    assert exits_in(PACKAGE / "__main__.py") == ["__main__.py:7"]


def test_the_exit_finder_finds_each_way_of_exiting(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os, sys\nsys.exit(1)\nos._exit(2)\nexit(3)\nquit()\nraise SystemExit(4)\n"
    )
    assert exits_in(module) == [f"m.py:{line}" for line in (2, 3, 4, 5, 6)]
