import json
import math
import os
import re
import sys
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger as snakemake_logger
from snakemake.utils import validate

# Rules run scripts in fresh processes (possibly on other nodes): they find the package this way.
PACKAGE_ROOT = str(Path(workflow.basedir) / "src")
sys.path.insert(0, PACKAGE_ROOT)
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (PACKAGE_ROOT, os.getenv("PYTHONPATH")) if p)
)

from ucpflow.config import (
    Settings,
    coerce_command_line_values,
    explain_validation_error,
    forget_vanished_demo,
)
from ucpflow.console import (
    failure_hint,
    hf_summary_line,
    install as install_console_filter,
    megatron_summary_line,
)
from ucpflow.errors import UcpflowError
from ucpflow.fileio import write_text
from ucpflow.helptext import help_text
from ucpflow.ptfile.allowlist import configure as allow_globals
from ucpflow.smk import (
    BASE_MEMORY_MB,
    job_memory_mb,
    job_runtime_minutes,
    named_index_files,
    run_in_process,
)
from ucpflow.source.signature import NO_SIGNATURE, workflow_signature
from ucpflow.stages.finalize import summary_line
from ucpflow.stages.publish import incomplete_parameter_stamp, publish_job as publish
from ucpflow.tables import (
    FP32_FILE,
    KIND_MODEL,
    MODEL_STATES_SUFFIX,
    OPTIMIZER_STATE_FILE,
    STAGING,
    ZERO,
    index_files,
    read_index_record,
    read_parameters,
)

SCHEMA = workflow.source_path("../schemas/config.schema.yaml")
try:
    coerce_command_line_values(config, SCHEMA)
    validate(config, schema="../schemas/config.schema.yaml", set_default=True)
    SETTINGS = Settings.from_config(config)
    # Every job (a fresh process, possibly on another node) reads the user's extra allowed globals from here.
    allow_globals(config["allow_globals"])
except WorkflowError as error:
    sys.exit(f"ucpflow error: {explain_validation_error(error)}")
except UcpflowError as error:
    sys.exit(f"ucpflow error: {error}")

# A failed job's console: its one `ucpflow error:` line, not Snakemake's exception report after it.
FAILURE_REPORT = install_console_filter(snakemake_logger)
STARTED = time.time()
OUT = SETTINGS.output_folder
WORK = SETTINGS.work_folder
# Everything derived from the input lives under a folder named by the input files' identity, so a
# changed input is indexed and converted again. A run folder that names no save to convert (see
# checkpoint_input) derives nothing: its many saves are not read for a signature.
SIGNATURE = (
    NO_SIGNATURE
    if SETTINGS.unconvertible
    else workflow_signature(config, SETTINGS.input_folder, SETTINGS.builds_demo)
)
DERIVED = f"{WORK}/{SIGNATURE}"
if SETTINGS.builds_demo:
    forget_vanished_demo(SETTINGS.demo_folder, DERIVED)
INDEX = f"{DERIVED}/index"
LOGS = f"{WORK}/logs"
BENCHMARKS = f"{WORK}/benchmarks"
INSPECT = SETTINGS.inspect_folder


_INDEX_CACHE = {}


def _read_index_file(path, reader):
    """Input functions run thousands of times: read each index file once per version on disk."""
    key = (path, os.path.getmtime(path), reader.__name__)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = reader(path)
    return _INDEX_CACHE[key]


def _read_json(path):
    with open(path) as handle:
        return json.load(handle)


def _read_buckets(path):
    return {row.param: row.bucket for row in read_parameters(path)}


_INDEX_OUTPUT = []


def index_output():
    """The outputs of the `index` checkpoint; raises until that job has run.

    `checkpoints.index.get()` expands the rule's outputs on every call, and input functions call it
    thousands of times; once it has succeeded it keeps succeeding, so it is asked only until then.
    """
    if not _INDEX_OUTPUT:
        _INDEX_OUTPUT.append(checkpoints.index.get().output)
    return _INDEX_OUTPUT[0]


def indexed_layout():
    """The index record (tables.IndexRecord) written by the `index` checkpoint."""
    return _read_index_file(index_output().layout, read_index_record)


def bucket_of_parameter():
    """{parameter: merge bucket} from the index."""
    return _read_index_file(index_output().params, _read_buckets)


def checkpoint_input(wildcards):
    """The demo is built by a rule; a user's folder only has to exist (its mtime never reruns the index).
    A run folder that names no save to convert (the HF Trainer's output_dir) stops every target but
    `inspect` here, while the DAG is built, with its one sentence (the console shows that line alone).
    """
    if SETTINGS.unconvertible:
        raise WorkflowError(f"ucpflow error: {SETTINGS.unconvertible}")
    if SETTINGS.builds_demo:
        return rules.demo_checkpoint.output.latest
    return ancient(SETTINGS.input_folder)


def inspect_input(wildcards):
    """A run folder's inspect reads the folder itself; a single checkpoint's is the conversion's input."""
    if SETTINGS.run_folder:
        return ancient(SETTINGS.input_folder)
    return checkpoint_input(wildcards)


def extraction_source(wildcards):
    sources = indexed_layout().sources
    if wildcards.source not in sources:
        raise WorkflowError(
            f"{wildcards.source} is not a file of the indexed checkpoint."
        )
    return sources[wildcards.source]


def _maps_of_bucket(bucket):
    names = indexed_layout().bucket_sources[bucket]
    return [f"{DERIVED}/extract/{name}.tsv" for name in names]


def bucket_maps(wildcards):
    return _maps_of_bucket(wildcards.bucket)


def parameter_bucket(wildcards):
    bucket = bucket_of_parameter().get(wildcards.param)
    if bucket is None:
        raise WorkflowError(
            f"{wildcards.param} is not a parameter of the indexed checkpoint."
        )
    return bucket


def universal_folder(wildcards):
    """The universal checkpoint's folder, for a job that writes into a folder inside it."""
    return OUT


def staged_bucket(wildcards):
    return f"{OUT}/{STAGING}/{parameter_bucket(wildcards)}"


def parameter_maps(wildcards):
    return _maps_of_bucket(parameter_bucket(wildcards))


def repair_request(wildcards):
    """A parameter folder that lost a file since it was published (fp32.pt is the declared target, the
    other states are written beside it) asks for a new, never-seen request file, which reruns its publish.
    """
    stamp = incomplete_parameter_stamp(
        f"{OUT}/{ZERO}/{wildcards.param}", _parameter_files()[wildcards.param]
    )
    return [f"{DERIVED}/repair/{wildcards.param}.{stamp}"] if stamp else []


def _read_parameter_files(path):
    return {row.param: row.files for row in read_parameters(path)}


def _parameter_files():
    return _read_index_file(index_output().params, _read_parameter_files)


def optimizer_state_file(wildcards):
    return indexed_layout().optimizer_state_source


def model_state_source(wildcards):
    copied = indexed_layout().layout.copy_files
    return {os.path.basename(path): path for path in copied}[wildcards.model_file]


def universal_outputs(wildcards):
    copied = indexed_layout().layout.copy_files
    return (
        [f"{OUT}/{ZERO}/{param}/{FP32_FILE}" for param in bucket_of_parameter()]
        + [rules.optimizer_state.output[0]]
        + [f"{OUT}/{os.path.basename(path)}" for path in copied]
    )


def _read_bucket_sizes(path):
    sizes = {}
    for row in read_parameters(path):
        size = sizes.setdefault(row.bucket, {"bytes": 0, "largest": 0})
        size["bytes"] += row.bytes
        size["largest"] = max(size["largest"], row.numel * 4)
    return sizes


def merge_mem_mb(wildcards):
    """A merge holds one parameter at a time: its fragments, the merged tensor and the write buffer."""
    sizes = _read_index_file(index_output().params, _read_bucket_sizes)
    return job_memory_mb(4 * sizes[wildcards.bucket]["largest"])


def merge_runtime(wildcards):
    """Minutes for a bucket at a pessimistic 50 MB/s of universal output, plus start-up."""
    sizes = _read_index_file(index_output().params, _read_bucket_sizes)
    return job_runtime_minutes(sizes[wildcards.bucket]["bytes"])


def all_extraction_maps(wildcards):
    return [f"{DERIVED}/extract/{name}.tsv" for name in indexed_layout().sources]


def verify_mem_mb(wildcards, threads):
    """Each of the verify job's processes holds one parameter's source slices at a time, as a merge does."""
    sizes = _read_index_file(index_output().params, _read_bucket_sizes)
    largest = max(size["largest"] for size in sizes.values())
    return BASE_MEMORY_MB + threads * math.ceil(4 * largest / 2**20)


def verify_runtime(wildcards):
    """Minutes to read the source fragments and the universal files once each, at a pessimistic 50 MB/s."""
    sizes = _read_index_file(index_output().params, _read_bucket_sizes)
    return job_runtime_minutes(2 * sum(size["bytes"] for size in sizes.values()))


def inspection_outputs(folder, category):
    """The tables and plot that `inspect` and `report_tables` write into `folder`."""
    return dict(
        summary=report(
            f"{folder}/summary.md", category=category, caption="../report/summary.rst"
        ),
        tables=multiext(
            f"{folder}/",
            "summary.csv",
            "files.csv",
            "files.md",
            "parameters.csv",
            "parameters.md",
            "experts.csv",
            "experts.md",
            "args.csv",
            "args.md",
        ),
        plot=report(
            f"{folder}/parameter_bytes.svg",
            category=category,
            caption="../report/parameter_bytes.rst",
        ),
    )


def inspect_outputs(folder):
    """What `inspect` writes: runs.md and runs.csv for a run folder (one row per save), else a checkpoint's
    tables and plot (inspection_outputs)."""
    if SETTINGS.run_folder:
        return dict(
            runs=report(
                f"{folder}/runs.md", category="Run", caption="../report/runs.rst"
            ),
            table=f"{folder}/runs.csv",
        )
    return inspection_outputs(folder, category="Checkpoint")


def staging_folder(path):
    """A merge job's staging folder: removed by Snakemake once published, unless keep_temp_folder."""
    return directory(path) if config["keep_temp_folder"] else temp(directory(path))


def publish_job(wildcards, input, log_path):
    """What a publish job does, in Snakemake's process (a fresh process per parameter would cost more
    than its work)."""
    run_in_process(
        log_path,
        publish,
        wildcards.param,
        input.staged,
        OUT,
        _parameter_files()[wildcards.param],
        parameter_bucket(wildcards),
        named_index_files(rules.index.output),
        parameter_maps(wildcards),
    )


def _written_in_this_run(path):
    path = Path(path)
    return path.is_file() and path.stat().st_mtime >= STARTED


def print_conversion_summary():
    """The last line of each target that finished its output in this run: what, where, what next."""
    seconds = time.time() - STARTED
    lines = []
    if _written_in_this_run(rules.finalize.output.summary):
        summary = json.loads(Path(rules.finalize.output.summary).read_text())
        lines.append(summary_line(summary, seconds))
    if _written_in_this_run(rules.export_megatron_finalize.output[0]):
        tp, pp = config["target_tp"], config["target_pp"]
        lines.append(megatron_summary_line(MEGATRON_FOLDER, tp, pp, seconds))
    if _written_in_this_run(rules.export_hf_finalize.output.config):
        lines.append(hf_summary_line(HF_FOLDER, seconds))
    for line in lines:
        print(line, file=sys.stderr)


# What `snakemake help` lists, in this order; each rule's docstring is its one-line description.
USER_TARGETS = (
    "universal",
    "reshard",
    "inspect",
    "inspect_reshard",
    "verify",
    "hf",
    "megatron",
    "help",
)


def print_help(log_path):
    """`snakemake help`: the targets and every config key with its default and meaning, from the schema
    (printed, and written to `log_path`)."""
    targets = []
    for name in USER_TARGETS:
        kind, _, description = (getattr(rules, name).rule.docstring or "").partition(
            ": "
        )
        default = "(the default; also `all`) " if "default" in kind else ""
        targets.append((name, default + description))
    text = help_text(SCHEMA, targets)
    write_text(log_path, text + "\n")
    print(text, flush=True)


def print_failure_hint(snakemake_logs):
    """The last line of a failed run: where the logs are (Snakemake's own pointer to its log is left out)."""
    if FAILURE_REPORT is not None:
        FAILURE_REPORT.failed = True
    print(failure_hint(LOGS, [str(path) for path in snakemake_logs]), file=sys.stderr)
