"""Importable classes for tests/test_ptfile.py, shaped like the objects DeepSpeed pickles.

They live in their own module so that `torch.load` can import them by name, while `ptfile.load`
must treat them as unknown globals (Opaque).
"""

import dataclasses
import enum


@dataclasses.dataclass
class Fragment:
    """Like deepspeed.utils.tensor_fragment.fragment_address (pickled via NEWOBJ + BUILD)."""

    numel: int
    start: int


class Stage(int, enum.Enum):
    """Like deepspeed.runtime.zero.config.ZeroStageEnum (pickled via REDUCE (cls, (value,)))."""

    disabled = 0
    optimizer_states = 1
    gradients = 2


class Scaler:
    """Like deepspeed.runtime.fp16.loss_scaler.LossScaler: a plain object with attributes."""

    def __init__(self, scale, dynamic):
        self.cur_scale = scale
        self.dynamic = dynamic

    def __eq__(self, other):
        return type(other) is Scaler and vars(other) == vars(self)


class Registry(dict):
    """A dict subclass with an attribute: pickled with SETITEMS and BUILD on the instance."""

    def __init__(self, *args, owner=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = owner


class Outer:
    class Inner:
        """A nested class: protocol 2 names it through getattr(Outer, "Inner")."""

        def __init__(self, value):
            self.value = value


class Sized:
    """An object created with keyword arguments to __new__ (NEWOBJ_EX, pickle protocol 4)."""

    def __new__(cls, *, size):
        obj = super().__new__(cls)
        obj.size = size
        return obj

    def __getnewargs_ex__(self):
        return (), {"size": self.size}

    def __getstate__(self):
        return None
