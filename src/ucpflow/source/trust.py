"""The trust scan of a checkpoint folder: every global outside the allowlist that any of its .pt files names."""

import os

from .. import ptfile
from ..errors import CheckpointError
from ..ptfile.guard import Finding
from .layout import resolve_tag_folder


def scan_folder(input_folder: str) -> list[Finding]:
    """The globals outside the allowlist in every .pt file of the checkpoint folder, as Findings (a file
    that cannot be read at all is left to the conversion's own checks, which name the problem)."""
    folder = resolve_tag_folder(input_folder)
    findings = []
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            if name.endswith(".pt"):
                try:
                    ptfile.load(os.path.join(root, name), findings)
                except CheckpointError:
                    continue
    return findings


def refuse_untrusted_folder(input_folder: str) -> None:
    """Print every finding (file, key path, global) and refuse the folder in one sentence if there are any."""
    findings = scan_folder(input_folder)
    for finding in findings:
        print(f"untrusted global\t{finding.file}\t{finding.key}\t{finding.name}")
    if findings:
        raise ptfile.UntrustedGlobalError(findings)
