"""Stand-ins for globals that are not imported: `Opaque` classes and instances, which remember how
the pickle built them so that `save` can emit the same global again."""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Mapping
from typing import Any


class _OpaqueClass(type):
    """Metaclass of the stand-in classes that replace globals this module does not import."""

    def __repr__(cls):
        return f"<opaque global {cls.opaque_module}.{cls.opaque_qualname}>"


class Opaque(metaclass=_OpaqueClass):
    """An object of a class that was not imported, recorded as the pickle built it.

    `opaque_module` / `opaque_qualname` name the global; `opaque_created_by` is "REDUCE" when the
    pickle called it with `opaque_args`, or "NEWOBJ" when it made an instance via
    `cls.__new__(cls, *opaque_args, **opaque_kwargs)`. `opaque_state` is the BUILD state,
    `opaque_items` / `opaque_entries` the list items and dict entries set on it. Attributes read
    from a dict state (`scaler.cur_scale`), `int(obj)` gives an int enum's value, and `save`
    emits all of it again so that `torch.load` rebuilds the real object.
    """

    opaque_module = ""
    opaque_qualname = ""
    opaque_created_by = "NEWOBJ"
    opaque_args = ()
    opaque_kwargs = {}
    opaque_state = None
    opaque_items = ()
    opaque_entries = {}

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.opaque_args = args
        if kwargs:
            obj.opaque_kwargs = kwargs
        return obj

    def __init__(self, *args, **kwargs):
        # Python runs __init__ only when the pickle calls the global (REDUCE), not for NEWOBJ.
        self.opaque_created_by = "REDUCE"

    def __setstate__(self, state):
        self.opaque_state = state

    def append(self, item: object) -> None:
        self.extend([item])

    def extend(self, items: Iterable[object]) -> None:
        if "opaque_items" not in self.__dict__:
            self.opaque_items = []
        self.opaque_items.extend(items)

    def __setitem__(self, key, value):
        if "opaque_entries" not in self.__dict__:
            self.opaque_entries = {}
        self.opaque_entries[key] = value

    def _state_dicts(self):
        state = self.opaque_state
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        return [part for part in parts if isinstance(part, dict)]

    def __getattr__(self, name):
        if not name.startswith("__"):
            for part in self._state_dicts():
                if name in part:
                    return part[name]
        raise AttributeError(f"{type(self).opaque_qualname} object (not imported) has no attribute {name!r}")

    def __int__(self):
        if len(self.opaque_args) == 1 and isinstance(self.opaque_args[0], int):
            return int(self.opaque_args[0])
        raise TypeError(f"{type(self).opaque_qualname} object was not built from a single int")

    @reprlib.recursive_repr()
    def __repr__(self):
        parts = [repr(arg) for arg in self.opaque_args]
        parts += [f"{key}={value!r}" for key, value in self.opaque_kwargs.items()]
        for state in self._state_dicts():
            parts += [f"{key}={value!r}" for key, value in state.items()]
        return f"{type(self).opaque_module}.{type(self).opaque_qualname}({', '.join(parts)})"


_opaque_classes = {}


def _opaque_class(module, qualname):
    key = (module, qualname)
    if key not in _opaque_classes:
        name = qualname.rpartition(".")[2]
        namespace = {
            "opaque_module": module,
            "opaque_qualname": qualname,
            "__qualname__": qualname,
            "__module__": module,
        }
        _opaque_classes[key] = _OpaqueClass(name, (Opaque,), namespace)
    return _opaque_classes[key]


def opaque_instance(module: str, qualname: str, state: Mapping[str, Any]) -> Opaque:
    """An instance of the (not imported) class `module.qualname` with `state` as its __dict__, as
    pickle protocol 2 records a plain object or dataclass; `save` writes it as the real class."""
    obj = _opaque_class(module, qualname)()
    obj.opaque_created_by = "NEWOBJ"
    obj.opaque_state = dict(state)
    return obj


def _pickled_getattr(target, name):
    """`getattr` as protocol-2 pickles use it to name nested classes; never runs on real objects."""
    if isinstance(target, _OpaqueClass):
        return _opaque_class(target.opaque_module, f"{target.opaque_qualname}.{name}")
    return _opaque_class("builtins", "getattr")(target, name)
