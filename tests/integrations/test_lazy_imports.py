"""Importing gradguard (and gradguard.integrations) imports no framework (Lightning, transformers)."""

from __future__ import annotations

import ast
import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def _imported_after(statement: str) -> list[str]:
    code = (f"import sys; {statement}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(out)


def test_gradguard_imports_no_framework() -> None:
    assert _imported_after("import gradguard, gradguard.integrations") == []
