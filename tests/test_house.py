"""The house rules a newcomer relies on: lines of at most 120 characters in the code we write (notebook code cells,
tests, benchmarks, deploy scripts), no test module importing another, and front ends that import no training stage."""
import ast
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

LIMIT = 120
STAGES = {"ingest", "preprocess", "features", "train", "evaluate", "register"}


def sources():
    "(name, text) of every code cell of the notebooks and every .py file we write (deepguard/ is generated from them)."
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] == "code":
                yield f"{nb.name} cell {i}", "".join(cell["source"])
    for folder in ("tests", "benchmarks", "deploy", "app"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()


def test_lines_are_at_most_120_characters():
    long = [f"{name}: {line[:60]}..." for name, text in sources() for line in text.split("\n") if len(line) > LIMIT]
    assert long == [], "\n".join(long)


def test_no_test_module_imports_another():
    "What tests share lives in tests/helpers.py (and fixtures in conftest.py); a test module is never imported."
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad = [n for n in names if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"]
            assert bad == [], f"{path.name} imports {bad}: move what it needs to tests/helpers.py"


@pytest.mark.parametrize("module", ["predict", "serving", "cli", "spark", "gateway"])
def test_front_ends_import_no_training_stage(module):
    code = (f"import json, sys, deepguard.{module}; "
            "print(json.dumps([m for m in sys.modules if m.startswith('deepguard.')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = {name.split(".")[1] for name in json.loads(out.strip().splitlines()[-1])}
    assert loaded & STAGES == set(), f"deepguard.{module} pulls in training stages {sorted(loaded & STAGES)}"
