"""The import layering of docs/design.md section 2, enforced with import-linter."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers():
    r = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--no-cache"],
        cwd=ROOT, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_transformers_imported_in_one_module():
    """docs/design.md: `transformers` is imported in one module only (rectiflow.models.text_base)."""
    offenders = []
    for path in (ROOT / "src" / "rectiflow").rglob("*.py"):
        text = path.read_text()
        if "import transformers" in text or "from transformers" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders in ([], ["src/rectiflow/models/text_base.py"]), offenders


def test_import_is_cheap_and_side_effect_free():
    code = "import sys, rectiflow; assert 'torch' not in sys.modules, 'import rectiflow pulled torch'"
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT / "src")},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
