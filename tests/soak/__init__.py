"""The soak (`pytest -m slow`): bench/faults.py's rounds at full counts. `faults` is that
module, loaded by path (bench/ is no package), for these tests and tests/test_faults_quick.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent.parent / "bench" / "faults.py"


def _load() -> ModuleType:
    name = "tq_bench_faults"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


faults = _load()
