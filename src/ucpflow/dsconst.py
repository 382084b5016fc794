"""DeepSpeed's checkpoint key names, read from the installed DeepSpeed without importing it.

`import deepspeed` costs seconds per process (it probes accelerators and builds ops), while
`deepspeed/checkpoint/constants.py` is a plain module of string constants. Loading that file on its
own gives every job the exact names DeepSpeed writes, at no start-up cost.
"""

import importlib.util
import sys
from pathlib import Path

from .errors import UcpflowError


def _load_constants():
    name = "ucpflow._deepspeed_checkpoint_constants"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        raise UcpflowError("DeepSpeed is not installed in this Python environment; install it with `pip install deepspeed`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "checkpoint" / "constants.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


_constants = _load_constants()
# The file of a save_dir naming the tag engine.save_checkpoint saved last (a literal in DeepSpeed's engine).
LATEST_FILE = "latest"


def __getattr__(key):
    return getattr(_constants, key)


def deepspeed_version() -> str:
    """The installed DeepSpeed's version string, read from package metadata (no import)."""
    from importlib.metadata import version

    return version("deepspeed")
