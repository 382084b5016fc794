"""The guard: what ptfile does before and after unpickling a data.pkl it did not write.

* `memory_cap` bounds what unpickling may allocate, so that a pickle whose memo indices or byte
  counts claim far more than it holds fails instead of exhausting the machine;
* `check_structure` walks the unpickled structure (each shared object once), refuses nesting deeper
  than any checkpoint has, and returns where the stand-ins of globals outside the allowlist sit;
* `refusal` words what was found as one sentence, and `bounded_repr` prints a value within a budget.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import resource
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence

from . import allowlist
from .dtypes import DType
from .standins import ArrayTensor, Device, Size, StorageRef, TensorRef

MAX_DEPTH = 200  # DeepSpeed's deepest structure (optimizer_state_dict.base_optimizer_state.state.0.exp_avg) is 5
SHOWN = 4  # findings named in one sentence

MEMORY_FACTOR = 64  # unpickled objects take up to this many times their pickle's bytes, plus MEMORY_BASE
MEMORY_BASE = 512 << 20


@contextlib.contextmanager
def memory_cap(pickle_bytes: int) -> Iterator[None]:
    """Cap the process's address space while a pickle of `pickle_bytes` is unpickled: a hostile memo index
    (the unpickler sizes its memo table by it), a byte count larger than the pickle or a pickled call
    asking for gigabytes then fails with MemoryError instead of exhausting the machine. The cap is for the
    whole process, so it is left off where other threads run (a publish job inside Snakemake's process)."""
    if threading.active_count() > 1:
        yield
        return
    try:
        with open("/proc/self/statm") as handle:
            in_use = int(handle.read().split()[0]) * resource.getpagesize()
    except OSError:  # not Linux: no cap
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = in_use + MEMORY_BASE + MEMORY_FACTOR * pickle_bytes
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def global_name(obj: object) -> str | None:
    """`module.qualname` of a ptfile stand-in (an Opaque class or instance), else None."""
    cls = obj if isinstance(obj, type) else type(obj)
    module = cls.__dict__.get("opaque_module") if hasattr(cls, "opaque_module") else None
    return f"{module}.{cls.opaque_qualname}" if module else None


def _children(obj):
    """(key text, child) pairs of a container or stand-in, or () for a leaf."""
    kind = type(obj)
    if kind is dict or isinstance(obj, dict):
        factory = [(".(default_factory)", obj.default_factory)] if isinstance(obj, collections.defaultdict) else []
        return [*((f".{key}", value) for key, value in obj.items()), *factory]
    if kind in (list, tuple) or isinstance(obj, (list, tuple)):
        return ((f"[{index}]", value) for index, value in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return (("{}", value) for value in obj)
    if isinstance(obj, argparse.Namespace):
        return ((f".{key}", value) for key, value in vars(obj).items())
    if hasattr(type(obj), "opaque_module") and not isinstance(obj, type):
        parts = [(f".(arg {i})", value) for i, value in enumerate(obj.opaque_args)]
        parts += [(f".(arg {key})", value) for key, value in obj.opaque_kwargs.items()]
        parts += [(".(state)", obj.opaque_state), (".(items)", list(obj.opaque_items))]
        parts += [(f".(entry {key!r})", value) for key, value in obj.opaque_entries.items()]
        return parts
    state = getattr(obj, "python_state", None) if hasattr(type(obj), "__slots__") else None
    if state:
        return [(".(python state)", state)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and vars(obj):
        return ((f".{key}", value) for key, value in vars(obj).items())
    return ()


_SCALARS = (str, bytes, int, float, bool, complex, type(None))
# Types `check_structure` need not look into: scalars and ptfile's tensor and dtype stand-ins.
_LEAVES = {*_SCALARS, TensorRef, StorageRef, DType, Size, Device, ArrayTensor}


def _too_deep(path):
    return f"a structure nested more than {MAX_DEPTH} levels deep (at {path.lstrip('.')[:200]})"


def check_structure(root: object, wanted: Collection[str | None]) -> tuple[dict[str, str], str | None]:
    """({global: key path} of the stand-ins named in `wanted` found in `root`, or a phrase when `root`
    nests deeper than MAX_DEPTH). Each object is visited once, so shared structures cost their size;
    key paths are only built when something is wanted."""
    leaves, seen = _LEAVES, set()
    if not wanted:
        stack = [(root, 0)]
        while stack:
            obj, depth = stack.pop()
            kind = type(obj)
            if kind in leaves or id(obj) in seen:
                continue
            seen.add(id(obj))
            if kind is dict:
                children = obj.values()
            elif kind is list or kind is tuple:
                children = obj
            else:
                children = [child for _, child in _children(obj)]
            if children and depth >= MAX_DEPTH:
                return {}, check_structure(root, {None})[1]
            stack.extend((child, depth + 1) for child in children)
        return {}, None
    found = {}
    stack = [("", root, 0)]
    while stack:
        path, obj, depth = stack.pop()
        name = global_name(obj)
        if name in wanted and name not in found:
            found[name] = path.lstrip(".") or "(top level)"
        if type(obj) in _SCALARS or id(obj) in seen:
            continue
        seen.add(id(obj))
        children = list(_children(obj))
        if children and depth >= MAX_DEPTH:
            return found, _too_deep(path)
        stack.extend((path + key, child, depth + 1) for key, child in children)
    return found, None


class Finding(tuple):
    """(file, key path, global) of a global outside the allowlist."""

    __slots__ = ()

    def __new__(cls, file, key, name):
        return super().__new__(cls, (str(file), key, name))

    file = property(lambda self: self[0])
    key = property(lambda self: self[1])
    name = property(lambda self: self[2])

    def phrase(self, with_file: bool = True) -> str:
        where = f" in {self.file}" if with_file else ""
        return f"`{self.name}` at key {self.key}{where}"


ADVICE = (
    "torch.load would import and run it, so ucpflow reads nothing from such a file (allow a global by name in "
    "config `allow_globals` only if you trust the file)"
)


def refusal(findings: Sequence[Finding]) -> str:
    """One sentence naming every finding (the first few, and how many more)."""
    files = {finding.file for finding in findings}
    with_file = len(files) > 1
    named = ", ".join(finding.phrase(with_file) for finding in findings[:SHOWN])
    more = f" and {len(findings) - SHOWN} more" if len(findings) > SHOWN else ""
    noun = "a global" if len(findings) == 1 else "globals"
    subject = f"Checkpoint file {next(iter(files))}" if not with_file else f"{len(files)} checkpoint files"
    return f"{subject} hold{'s' if not with_file else ''} {noun} outside ucpflow's allowlist: {named}{more}; {ADVICE}."


def untrusted_names(names: Iterable[str]) -> list[str]:
    return [name for name in names if not allowlist.is_allowed(name)]


def bounded_repr(value: object, limit: int = 120) -> str:
    """repr(value) cut at about `limit` characters, built within that budget (a structure whose parts
    the pickle memo shares can repr to terabytes)."""
    out, budget = [], [limit + 1]

    def emit(text):
        out.append(text[: max(budget[0], 0)])
        budget[0] -= len(text)

    def items(opening, parts, closing, depth, keyword=False):
        emit(opening)
        for index, part in enumerate(parts):
            if budget[0] <= 0:
                return
            emit(", " if index else "")
            if isinstance(part, tuple) and len(part) == 3 and part[0] is _PAIR:
                if keyword and isinstance(part[1], str):
                    emit(f"{part[1]}=")
                else:
                    visit(part[1], depth + 1)
                    emit(": ")
                part = part[2]
            visit(part, depth + 1)
        emit(closing)

    def visit(obj, depth):
        if budget[0] <= 0:
            return
        name = global_name(obj)
        if depth > 8:
            emit("...")
        elif isinstance(obj, dict):
            prefix = "" if type(obj) is dict else f"{type(obj).__name__}("
            items(prefix + "{", ((_PAIR, key, item) for key, item in obj.items()), "}" + (")" if prefix else ""), depth)
        elif isinstance(obj, (list, tuple, set, frozenset)) and type(obj).__repr__ in _CONTAINER_REPRS:
            opening, closing = {list: ("[", "]"), tuple: ("(", ")")}.get(type(obj), (f"{type(obj).__name__}({{", "})"))
            items(opening, obj, closing, depth)
        elif name and not isinstance(obj, type):
            state = [(_PAIR, key, item) for part in obj._state_dicts() for key, item in part.items()]
            items(f"{name}(", [*obj.opaque_args, *state], ")", depth, keyword=True)
        elif isinstance(obj, argparse.Namespace):
            items("Namespace(", ((_PAIR, key, item) for key, item in vars(obj).items()), ")", depth, keyword=True)
        elif isinstance(obj, (str, bytes)):
            emit(repr(obj[: limit + 2]))
        else:
            emit(repr(obj))

    visit(value, 0)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PAIR = object()
_CONTAINER_REPRS = (list.__repr__, tuple.__repr__, set.__repr__, frozenset.__repr__)
