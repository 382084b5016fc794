"""The benchmark checkpoints: real DeepSpeed checkpoints (DP=2, bf16, ZeRO-1) built once on the CPU and cached."""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.measure import sampling
from ucpflow.stages.finalize import folder_bytes

BUILD_TIMEOUT = 3600
COMPLETE_MARKER = ".complete"
BUILD_RECORD = "build.json"


@dataclass(frozen=True)
class Case:
    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int = 64
    steps: int = 1

    def train_options(self):
        return dict(
            zero_stage=1,
            dtype="bf16",
            layers=self.layers,
            hidden=self.hidden,
            heads=self.heads,
            vocab=self.vocab,
            seq_len=self.seq_len,
            steps=self.steps,
        )


CASES = {
    case.name: case
    for case in (
        Case("many", layers=48, hidden=64, heads=4, vocab=500),
        Case("gpt124", layers=12, hidden=768, heads=12, vocab=50257),
        Case("gpt355", layers=24, hidden=1024, heads=16, vocab=50257),
    )
}
NUM_PROCS = 2
# The workflow's default demo checkpoint (config.yaml's demo settings): not a case of `python -m bench`, but
# the smallest size of bench.scaling and the save copied by bench.runs.
DEMO = Case("demo", layers=2, hidden=64, heads=4, vocab=500, seq_len=32, steps=4)


def checkpoint_tag_folder(case, cache):
    """The tag folder of the case's checkpoint, built with DeepSpeed unless the cache has it already."""
    save_dir = Path(cache) / "checkpoints" / case.name
    if not (save_dir / COMPLETE_MARKER).is_file():
        build(case, save_dir)
    return save_dir / (save_dir / "latest").read_text().strip()


def build(case, save_dir):
    from ucpflow.demo.launch import build_checkpoint

    shutil.rmtree(save_dir, ignore_errors=True)
    print(f"[bench] building the {case.name} checkpoint with DeepSpeed ({NUM_PROCS} CPU processes) ...", flush=True)
    load_before = os.getloadavg()
    with sampling() as measured:
        tag_folder = build_checkpoint(save_dir, num_procs=NUM_PROCS, timeout=BUILD_TIMEOUT, **case.train_options())
    record = {
        "case": case.name,
        "options": case.train_options(),
        "wall_s": round(measured.wall, 1),
        "peak_rss_process_bytes": measured.sampler.peak_rss_process,
        "peak_rss_tree_bytes": measured.sampler.peak_rss_tree,
        "checkpoint_bytes": folder_bytes(tag_folder),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    (save_dir / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    (save_dir / COMPLETE_MARKER).write_text("ok\n")
    print(
        f"[bench] built {tag_folder} in {measured.wall:.0f} s, peak RSS of one process "
        f"{measured.sampler.peak_rss_process / 2**30:.2f} GiB, "
        f"of the tree {measured.sampler.peak_rss_tree / 2**30:.2f} GiB",
        flush=True,
    )


def build_record(tag_folder):
    path = Path(tag_folder).parent / BUILD_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
