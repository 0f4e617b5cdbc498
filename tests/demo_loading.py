"""demo/demo.py as a module for tests: it is a script that puts demo/ on sys.path, as detectron2's demo does, so
``demo`` is not importable as a package once it has run; each test file loads it under its own module name."""

import importlib.util
from pathlib import Path
from types import ModuleType

DEMO_SCRIPT = Path(__file__).resolve().parents[1] / "demo" / "demo.py"


def load_demo_cli(module_name: str) -> ModuleType:
    """Run demo/demo.py as the module ``module_name``; afterwards ``import predictor`` finds demo/predictor.py."""
    spec = importlib.util.spec_from_file_location(module_name, DEMO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
