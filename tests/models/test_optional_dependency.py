"""transformers is an optional dependency: linmix works without it, linmix.models says what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_models_without_transformers_raise_a_helpful_import_error():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "import linmix, linmix.layers  # the rest of the library imports fine\n"
        "try:\n"
        "    import linmix.models\n"
        "except ImportError as err:\n"
        "    print('ImportError:', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ImportError: linmix.models needs the transformers package: pip install linmix[models]" in result.stdout
