"""Compare two universal checkpoint folders: the same files, the same keys, torch.equal tensors."""

import math
import os
from pathlib import Path

import torch


def _files(folder):
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def compare_objects(a, b, where, problems):
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            problems.append(f"{where}: tensor vs {type(b).__name__ if torch.is_tensor(a) else type(a).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b):
            problems.append(f"{where}: tensor values differ")
        return
    if type(a) is not type(b):
        problems.append(f"{where}: {type(a).__name__} vs {type(b).__name__}")
        return
    if isinstance(a, dict):
        if list(a) != list(b):
            problems.append(f"{where}: keys {list(a)} vs {list(b)}")
            return
        for key in a:
            compare_objects(a[key], b[key], f"{where}[{key!r}]", problems)
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            problems.append(f"{where}: length {len(a)} vs {len(b)}")
            return
        for index, (x, y) in enumerate(zip(a, b)):
            compare_objects(x, y, f"{where}[{index}]", problems)
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        compare_objects(vars(a), vars(b), f"{where}.__dict__", problems)
    elif a != b and not (a != a and b != b):
        problems.append(f"{where}: {a!r} vs {b!r}")


def compare_universal(ours, theirs, latest_ours=None, latest_theirs=None):
    """A list of differences between two universal checkpoint folders (empty when identical)."""
    problems = []
    files_ours, files_theirs = _files(ours), _files(theirs)
    if files_ours != files_theirs:
        only_ours = sorted(set(files_ours) - set(files_theirs))
        only_theirs = sorted(set(files_theirs) - set(files_ours))
        problems.append(f"file sets differ: only ours {only_ours[:10]}, only theirs {only_theirs[:10]}")
    for name in sorted(set(files_ours) & set(files_theirs)):
        a, b = os.path.join(ours, name), os.path.join(theirs, name)
        if name.endswith(".pt"):
            compare_objects(torch.load(a, weights_only=False), torch.load(b, weights_only=False), name, problems)
        elif Path(a).read_bytes() != Path(b).read_bytes():
            problems.append(f"{name}: contents differ")
    if latest_ours or latest_theirs:
        if Path(latest_ours).read_text() != Path(latest_theirs).read_text():
            problems.append("latest_universal differs")
    return problems


def resume_from_ours(ours, theirs, resume, steps=2):
    """The losses of DeepSpeed resuming from ucpflow's output `ours` with `resume(checkpoint_root)`, after
    checking that `ours` is identical to ds_to_universal's `theirs`: DeepSpeed's loader reads exactly these
    objects, so resuming from `theirs` as well would repeat the same computation (tests/test_resume.py
    does both once, and finds the losses equal)."""
    latest = "latest_universal"
    assert compare_universal(ours, theirs, ours.parent / latest, theirs.parent / latest) == []
    losses = resume(ours.parent)
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses), losses
    return losses
