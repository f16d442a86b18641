"""The package stays readable: no module over 400 lines, no function over 60, docs cite files in the repo."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_idrs"
REPO = PACKAGE.parent


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def test_code_cites_documents_that_exist():
    cited = set()
    for path in PACKAGE.rglob("*.py"):
        cited |= set(re.findall(r"docs/[\w/]+\.md", path.read_text()))
        assert "PAPER.md" not in path.read_text() and "design notes" not in path.read_text(), path
    assert cited and all((REPO / doc).is_file() for doc in cited), sorted(cited)
