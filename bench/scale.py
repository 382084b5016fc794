"""Dry-run scale check: `snakemake -n` on a synthetic index shaped like BLOOM-176B's checkpoint.

BLOOM-176B was trained with Megatron-DeepSpeed on TP4 x PP12 x DP8 (ZeRO-1, bf16): 384 optimizer
files, 70 transformer layers, hidden 14336, padded vocabulary 250880. The index tables are written
from those shapes alone, the way `ucpflow.stages.index.index_job` writes them (same columns, same bucketing,
same layout record), and the checkpoint files are empty placeholders: no tensor is ever created.
The workflow finds a complete index in its work folder and plans every job after it (extract,
merge, publish, copy, finalize) without running the index again.
"""

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ucpflow import dsconst as C
from ucpflow import ptfile
from ucpflow.source.patterns import classify
from ucpflow.stages.index import assign_buckets, bucket_sources, optimizer_state_source, source_kinds
from ucpflow.tables import (
    FORMAT_MERGED,
    Fragment,
    IndexRecord,
    Layout,
    Parameter,
    RankFile,
    index_files,
    source_name,
    write_fragments,
    write_index_record,
    write_parameters,
)

TP, PP, DP = 4, 12, 8
LAYERS, HIDDEN, VOCAB, ORIGINAL_VOCAB = 70, 14336, 250880, 250680
FFN = 4 * HIDDEN
# Megatron-DeepSpeed's GPTModelPipe numbers its pipeline layers: 0 fp16 cast, 1 embedding, 2 transpose,
# 3.. transformer layers, then a transpose and the final layernorm.
FIRST_LAYER = 3
FINAL_NORM = FIRST_LAYER + LAYERS + 1
EMBED = "tied_modules.embed"
STATES = ("fp32", "exp_avg", "exp_avg_sq", "step")
DEFAULT_JOB_BYTES = 4_000_000_000
DEFAULT_MIN_JOBS = 2
TAG = "global_step1"

UNIVERSAL_INFO = {
    C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    C.ORIGINAL_VOCAB_SIZE: ORIGINAL_VOCAB,
    C.PADDED_VOCAB_SIZE: VOCAB,
    C.VOCABULARY_PARAMETER_PATTERNS: [rf"{EMBED}.word_embeddings.weight"],
    C.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [
        rf"{EMBED}.word_embeddings.weight",
        rf"{EMBED}.word_embeddings_layernorm.weight",
        rf"{EMBED}.word_embeddings_layernorm.bias",
    ],
    C.TP_REPLICATED_PARAMETER_PATTERNS: [
        rf"{EMBED}.word_embeddings_layernorm.weight",
        rf"{EMBED}.word_embeddings_layernorm.bias",
        r"\d+.input_layernorm.weight",
        r"\d+.input_layernorm.bias",
        r"\d+.post_attention_layernorm.weight",
        r"\d+.post_attention_layernorm.bias",
        r"\d+.self_attention.dense.bias",
        r"\d+.mlp.dense_4h_to_h.bias",
        r"\d+.final_layernorm.weight",
        r"\d+.final_layernorm.bias",
    ],
    C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r"\d+.self_attention.dense.weight", r"\d+.mlp.dense_4h_to_h.weight"],
}


def embedding_parameters():
    return [
        (f"{EMBED}.word_embeddings.weight", (VOCAB // TP, HIDDEN)),
        (f"{EMBED}.word_embeddings_layernorm.weight", (HIDDEN,)),
        (f"{EMBED}.word_embeddings_layernorm.bias", (HIDDEN,)),
    ]


def layer_parameters(index):
    """The per-TP-rank shapes of one BLOOM transformer layer's parameters, in module order."""
    prefix = f"{FIRST_LAYER + index}"
    return [
        (f"{prefix}.input_layernorm.weight", (HIDDEN,)),
        (f"{prefix}.input_layernorm.bias", (HIDDEN,)),
        (f"{prefix}.self_attention.query_key_value.weight", (3 * HIDDEN // TP, HIDDEN)),
        (f"{prefix}.self_attention.query_key_value.bias", (3 * HIDDEN // TP,)),
        (f"{prefix}.self_attention.dense.weight", (HIDDEN, HIDDEN // TP)),
        (f"{prefix}.self_attention.dense.bias", (HIDDEN,)),
        (f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{prefix}.post_attention_layernorm.bias", (HIDDEN,)),
        (f"{prefix}.mlp.dense_h_to_4h.weight", (FFN // TP, HIDDEN)),
        (f"{prefix}.mlp.dense_h_to_4h.bias", (FFN // TP,)),
        (f"{prefix}.mlp.dense_4h_to_h.weight", (HIDDEN, FFN // TP)),
        (f"{prefix}.mlp.dense_4h_to_h.bias", (HIDDEN,)),
    ]


def stage_parameters():
    """[(name, per-TP shape)] of each pipeline stage: layers split evenly, the tied embedding on both ends."""
    counts = [LAYERS // PP + (1 if stage < LAYERS % PP else 0) for stage in range(PP)]
    stages, first = [], 0
    for stage, count in enumerate(counts):
        params = embedding_parameters() if stage == 0 else []
        for index in range(first, first + count):
            params += layer_parameters(index)
        if stage == PP - 1:
            params += [
                (f"{FINAL_NORM}.final_layernorm.weight", (HIDDEN,)),
                (f"{FINAL_NORM}.final_layernorm.bias", (HIDDEN,)),
            ]
            params += embedding_parameters()
        stages.append(params)
        first += count
    return stages


def rank_file_name(pp, tp, dp):
    return f"{C.BF16_ZERO_FILE_PREFIX}{dp}_{C.MODEL_FILE_PREFIX}{pp * TP + tp:02d}{C.OPTIM_FILE_SUFFIX}"


def fragment_rows(folder, stages):
    """ZeRO-1 partitions each (pp, tp) rank's flat parameter buffer into DP equal parts (one param group)."""
    replicated = UNIVERSAL_INFO[C.PIPELINE_REPLICATED_PARAMETER_PATTERNS]
    rows = []
    for pp, params in enumerate(stages):
        total = sum(math.prod(shape) for _, shape in params)
        partition = math.ceil(total / DP)
        for tp in range(TP):
            start = 0
            for name, shape in params:
                numel = math.prod(shape)
                skipped = pp > 0 and any(re.match(p, name) for p in replicated)
                for dp in range(start // partition, (start + numel - 1) // partition + 1):
                    if skipped:
                        break
                    lo, hi = max(start, dp * partition), min(start + numel, (dp + 1) * partition)
                    path = str(folder / rank_file_name(pp, tp, dp))
                    for state in STATES:
                        offset, count = (0, 1) if state == "step" else (lo - dp * partition, hi - lo)
                        rows.append(Fragment(name, state, tp, pp, dp, path, f"{state}/0", offset, count, shape))
                start += numel
    return rows


def parameter_table(stages):
    seen, rows = set(), []
    for params in stages:
        for name, shape in params:
            if name in seen:
                continue
            seen.add(name)
            rule = classify(UNIVERSAL_INFO, name, has_slices=True)
            rows.append(
                Parameter(
                    param=name,
                    format=FORMAT_MERGED,
                    merge=rule.kind,
                    vocabulary=rule.vocabulary,
                    shapes=[tuple(shape)] * TP,
                    states=tuple(sorted(STATES)),
                    numel=TP * math.prod(shape),
                )
            )
    return rows


def synthetic_signature(folder):
    """The work-folder signature the workflow computes for `folder` with the schema's default config."""
    import yaml

    from ucpflow.source.signature import workflow_signature

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml").read_text())
    defaults = {key: spec.get("default") for key, spec in schema["properties"].items()}
    return workflow_signature(defaults, str(folder), builds_demo=False)


def write_synthetic_index(root, *, job_bytes=DEFAULT_JOB_BYTES, min_jobs=DEFAULT_MIN_JOBS):
    """Placeholder checkpoint files and the index tables under `root`; returns (input, output, work) folders."""
    root = Path(root).resolve()
    shutil.rmtree(root, ignore_errors=True)
    folder, work = root / "checkpoint" / TAG, root / "work"
    output = root / "universal" / f"{TAG}_universal"
    folder.mkdir(parents=True)
    stages = stage_parameters()
    rank_files = [
        RankFile(str(folder / rank_file_name(pp, tp, dp)), pp, tp, dp)
        for pp in range(PP)
        for tp in range(TP)
        for dp in range(DP)
    ]
    model_files = [str(folder / f"{C.MODEL_FILE_PREFIX}{mp:02d}{C.MODEL_FILE_SUFFIX}") for mp in range(PP * TP)]
    for path in [r.path for r in rank_files] + model_files:
        Path(path).touch()
    layout = Layout(
        folder=str(folder),
        zero_stage=1,
        pp_degree=PP,
        tp_degree=TP,
        dp_degree=DP,
        rank_files=rank_files,
        model_files=model_files,
        copy_files=model_files,
        universal_info=UNIVERSAL_INFO,
        global_steps=1,
    )
    fragments = fragment_rows(folder, stages)
    params = assign_buckets(parameter_table(stages), job_bytes=job_bytes, min_jobs=min_jobs)

    index = work / synthetic_signature(folder) / "index"
    index.mkdir(parents=True)
    outputs = index_files(str(index))
    record = IndexRecord(
        layout=layout,
        universal_info_file=outputs.info,
        output_folder=str(output),
        optimizer_state_source=optimizer_state_source(layout),
        sources=source_kinds(layout, params),
        bucket_sources={b: [source_name(p) for p in files] for b, files in bucket_sources(fragments, params).items()},
        hf_config_folder=None,
    )
    ptfile.save(UNIVERSAL_INFO, outputs.info)
    write_fragments(outputs.fragments, fragments)
    write_parameters(outputs.params, params)
    write_index_record(outputs.layout, record)
    return (
        folder,
        output,
        work,
        {
            "rank_files": len(rank_files),
            "parameters": len(params),
            "fragments": len(fragments),
            "merge_jobs": len({p.bucket for p in params}),
        },
    )


JOB_COUNT = re.compile(r"^(\w+)\s+(\d+)$")


def job_counts(snakemake_output):
    """{rule: jobs} from the 'Job stats' table of Snakemake's dry-run output."""
    counts = {}
    in_table = False
    for line in snakemake_output.splitlines():
        if line.startswith("Job stats:"):
            in_table, counts = True, {}
        elif in_table:
            match = JOB_COUNT.match(line.strip())
            if match:
                counts[match.group(1)] = int(match.group(2))
            elif counts and not line.strip():
                in_table = False
    return counts


def time_dry_run(root, snakefile, repeats, log_folder):
    """Build the synthetic index once, then time `snakemake -n` on it `repeats` times (fresh --directory each)."""
    folder, output, work, shape = write_synthetic_index(root)
    runs = []
    for attempt in range(repeats):
        directory = Path(root) / f"run{attempt}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        command = [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(snakefile),
            "--directory",
            str(directory),
            "--cores",
            "2",
            "-n",
            "--quiet",
            "rules",
            "--config",
            f"input_folder={folder}",
            f"output_folder={output}",
            f"work_folder={work}",
        ]
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=snakemake_env())
        wall = time.perf_counter() - started
        log_path = Path(log_folder) / f"dry_run_{attempt}.log"
        log_path.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"snakemake -n failed on the synthetic index; see {log_path}")
        runs.append({"wall_s": wall, "load_1min": load, "jobs": job_counts(result.stdout + result.stderr)})
    return shape, runs


def snakemake_env():
    """Jobs find this Python first on PATH, as when snakemake runs from an activated environment."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
