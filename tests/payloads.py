"""Pickle payloads planted into copies of real DeepSpeed checkpoint files, as an attacker would plant them:
the file is loaded with torch and saved again with one value replaced by raw pickle opcodes that run
code when `torch.load(weights_only=False)` reads it (each creates a marker file)."""

import argparse
import builtins
import os
import pickle
import pickletools
import struct
import subprocess

import torch


class Call:
    """Pickles as `function(*args)`: a call that torch.load makes while reading the file."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __call__(self):
        raise AssertionError("only pickled")

    def __reduce__(self):
        return self.function, self.args


def _ops(obj):
    """The opcodes that push `obj` (no PROTO, no STOP, no memo entries)."""
    data = pickletools.optimize(pickle.dumps(obj, protocol=2))
    assert data.startswith(b"\x80\x02") and data.endswith(b".")
    return data[2:-1]


def _text(value):
    encoded = value.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def _setstate_trick(marker):
    """BUILD sets `__setstate__` in a Namespace's __dict__; the second BUILD calls it: os.system(...)."""
    return (b"cargparse\nNamespace\n)R}" + _text("__setstate__") + b"cos\nsystem\nsb" + _text(f"touch {marker}")
            + b"b")


# kind -> (function of the marker path giving the opcodes, the global the refusal must name)
PAYLOADS = {
    "os_system": (lambda m: _ops(Call(os.system, f"touch {m}")), "posix.system"),
    "builtins_eval": (lambda m: _ops(Call(builtins.eval, f"open({str(m)!r}, 'w').close()")), "builtins.eval"),
    "builtins_exec": (lambda m: _ops(Call(builtins.exec, f"open({str(m)!r}, 'w').close()")), "builtins.exec"),
    "setstate_build": (_setstate_trick, "os.system"),
    "getattr_chain": (lambda m: _ops(Call(Call(getattr, Call(builtins.__import__, "os"), "system"), f"touch {m}")),
                      "builtins.getattr"),
    "subprocess": (lambda m: _ops(Call(subprocess.check_call, ["touch", str(m)])), "subprocess.check_call"),
}


class Planted:
    """Stands for the payload in the structure being saved."""

    def __init__(self, ops):
        self.ops = ops


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Planted] = lambda self, obj: self.write(obj.ops)


class _PickleModule:
    Pickler = _Pickler
    Unpickler = pickle.Unpickler
    load = pickle.load


def plant(path, key_path, kind, marker):
    """Rewrite torch checkpoint `path` with payload `kind` at `key_path` (keys and attributes, e.g.
    ("args", "seed") inside Megatron's Namespace). Returns the global a refusal must name."""
    make_ops, name = PAYLOADS[kind]
    structure = torch.load(path, weights_only=False)
    parent = structure
    for key in key_path[:-1]:
        parent = vars(parent) if isinstance(parent, argparse.Namespace) else parent
        parent = parent[key]
    target = vars(parent) if isinstance(parent, argparse.Namespace) else parent
    target[key_path[-1]] = Planted(make_ops(marker))
    torch.save(structure, path, pickle_module=_PickleModule, _use_new_zipfile_serialization=True)
    return name
