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
from ucpflow.export.megatron import TRACKER_FILE as MEGATRON_TRACKER
from ucpflow.fileio import write_text
from ucpflow.helptext import help_text
from ucpflow.ptfile.allowlist import configure as allow_globals
from ucpflow.smk import (
    BASE_MEMORY_MB,
    exit_without_waiting,
    job_memory_mb,
    job_runtime_minutes,
    run_in_process,
    SAVES_NAMED_ENV,
)
from ucpflow.stages.finalize import summary_line, write_latest_universal
from ucpflow.stages.publish import incomplete_parameter_stamp, publish_job as publish
from ucpflow.targets import SAVE_WILDCARDS, select
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
    # The saves this run converts (one, or a run's saves chosen by `tags`), each named in the rules' paths.
    SELECTION = select(config, SETTINGS)
    # Every job (a fresh process, possibly on another node) reads the user's extra allowed globals from here.
    allow_globals(config["allow_globals"])
except WorkflowError as error:
    sys.exit(f"ucpflow error: {explain_validation_error(error)}")
except UcpflowError as error:
    sys.exit(f"ucpflow error: {error}")

# A failed job's console: its one `ucpflow error:` line, not Snakemake's exception report after it.
FAILURE_REPORT = install_console_filter(snakemake_logger)
STARTED = time.time()
WORK = SETTINGS.work_folder
LOGS = f"{WORK}/logs"
BENCHMARKS = f"{WORK}/benchmarks"
INSPECT = SETTINGS.inspect_folder
SAVES = SELECTION.saves
# Jobs' progress lines name their save when there are several (ucpflow.smk).
os.environ[SAVES_NAMED_ENV] = "1" if SETTINGS.many else ""
SAVE_BY = {name: SELECTION.by(name) for name in SAVE_WILDCARDS}
for notice in SELECTION.notices:
    print(f"ucpflow: {notice}", file=sys.stderr)


def _one_of(values):
    return "|".join(re.escape(value) for value in values) or "(?!)"


# Every save is named in the paths of the rules by one of these wildcards (ucpflow.targets.SaveTarget.key):
# a folder in a root (the universal checkpoint, the exports, the reshard) or a path in the work folder.
# Everything derived from a save lives under a folder named by its input files' identity, so a changed save
# is indexed and converted again, and an unchanged one is left alone. (The Snakefile declares them.)
SAVE_WILDCARD_CONSTRAINTS = {name: _one_of(SAVE_BY[name]) for name in SAVE_WILDCARDS}
# Path patterns of the rules' outputs: a save's work folder and its universal checkpoint's folder.
DERIVED = f"{WORK}/{{derived}}"
INDEX = f"{DERIVED}/index"
UNIVERSAL_FOLDER = os.path.join(SELECTION.root("universal"), "{universal}")
LATEST_UNIVERSAL_FILE = SETTINGS.latest_universal
if SETTINGS.builds_demo:
    forget_vanished_demo(SETTINGS.demo_folder, f"{WORK}/{SAVES[0].derived}")


def save_of(wildcards):
    """The save (ucpflow.targets.SaveTarget) a job's wildcards name."""
    for name, value in wildcards.items():
        if name in SAVE_BY:
            return SAVE_BY[name][value]
    raise WorkflowError(f"ucpflow: no save named in {dict(wildcards.items())}.")


def derived_of(save):
    return f"{WORK}/{save.derived}"


def work_input(relative):
    """A file of the job's save's work folder (a plan, a summary) as an input function."""
    return lambda wildcards: f"{derived_of(save_of(wildcards))}/{relative}"


def summary_of(save):
    """The save's finalize summary: written last, once its universal checkpoint is complete."""
    return f"{derived_of(save)}/summary.json"


def index_of(save):
    """The paths of a save's index files (tables.IndexFiles)."""
    return index_files(f"{derived_of(save)}/index")


def index_inputs(wildcards):
    """The job's save's index files as named inputs (with unpack)."""
    return index_of(save_of(wildcards))._asdict()


def index_input(name):
    """One index file of the job's save as an input function."""
    return lambda wildcards: getattr(index_of(save_of(wildcards)), name)


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


_INDEX_DONE = set()


def index_output(save):
    """The outputs of `save`'s `index` checkpoint; raises until that job has run.

    `checkpoints.index.get()` expands the rule's outputs on every call, and input functions call it
    thousands of times; once it has succeeded for a save it keeps succeeding, so it is asked only until then.
    """
    if save.derived not in _INDEX_DONE:
        checkpoints.index.get(derived=save.derived)
        _INDEX_DONE.add(save.derived)
    return index_of(save)


def indexed_layout(save):
    """The index record (tables.IndexRecord) written by the save's `index` checkpoint."""
    return _read_index_file(index_output(save).layout, read_index_record)


def bucket_of_parameter(save):
    """{parameter: merge bucket} from the save's index."""
    return _read_index_file(index_output(save).params, _read_buckets)


def refuse_unconvertible(wildcards=None):
    """What a target needs before any save: nothing, unless the input names no save to convert. A run folder
    that names none (the HF Trainer's output_dir without `tags`) stops every target but `inspect` here, while
    the DAG is built, with its one sentence (the console shows that line alone)."""
    if SETTINGS.unconvertible:
        raise WorkflowError(f"ucpflow error: {SETTINGS.unconvertible}")
    return []


def _input_folder(folder):
    """The demo is built by a rule; a user's folder only has to exist (its mtime never reruns the index)."""
    refuse_unconvertible()
    if SETTINGS.builds_demo:
        return rules.demo_checkpoint.output.latest
    return ancient(folder)


def checkpoint_input(wildcards):
    """What the job's save's index (or reshard inspection) reads."""
    return _input_folder(save_of(wildcards).input_folder)


def inspect_input(wildcards):
    """A run folder's inspect reads the folder itself; a single checkpoint's is the conversion's input."""
    if SETTINGS.run_folder:
        return ancient(SETTINGS.input_folder)
    return _input_folder(SETTINGS.input_folder)


def extraction_source(wildcards):
    sources = indexed_layout(save_of(wildcards)).sources
    if wildcards.source not in sources:
        raise WorkflowError(
            f"{wildcards.source} is not a file of the indexed checkpoint."
        )
    return sources[wildcards.source]


def extraction_maps(save, names):
    return [f"{derived_of(save)}/extract/{name}.tsv" for name in names]


def save_maps(save):
    """The extraction maps of every file of the save (rank files and model states)."""
    return extraction_maps(save, indexed_layout(save).sources)


def is_indexed(save):
    """Whether the save's index is written, so that asking for it raises nothing: a target that lists every
    save's files asks only for those (one index raising there would hold back the other saves).
    """
    return os.path.exists(index_of(save).layout)


def _maps_of_bucket(save, bucket):
    return extraction_maps(save, indexed_layout(save).bucket_sources[bucket])


def bucket_maps(wildcards):
    return _maps_of_bucket(save_of(wildcards), wildcards.bucket)


def parameter_bucket(wildcards):
    bucket = bucket_of_parameter(save_of(wildcards)).get(wildcards.param)
    if bucket is None:
        raise WorkflowError(
            f"{wildcards.param} is not a parameter of the indexed checkpoint."
        )
    return bucket


def universal_folder(wildcards):
    """The universal checkpoint's folder of the job's save."""
    return save_of(wildcards).universal


def staged_bucket(wildcards):
    return f"{universal_folder(wildcards)}/{STAGING}/{parameter_bucket(wildcards)}"


def parameter_maps(wildcards):
    return _maps_of_bucket(save_of(wildcards), parameter_bucket(wildcards))


def repair_request(wildcards):
    """A parameter folder that lost a file since it was published (fp32.pt is the declared target, the
    other states are written beside it) asks for a new, never-seen request file, which reruns its publish.
    """
    save = save_of(wildcards)
    stamp = incomplete_parameter_stamp(
        f"{save.universal}/{ZERO}/{wildcards.param}",
        _parameter_files(save)[wildcards.param],
    )
    return [f"{derived_of(save)}/repair/{wildcards.param}.{stamp}"] if stamp else []


def _read_parameter_files(path):
    return {row.param: row.files for row in read_parameters(path)}


def _parameter_files(save):
    return _read_index_file(index_output(save).params, _read_parameter_files)


def optimizer_state_file(wildcards):
    return indexed_layout(save_of(wildcards)).optimizer_state_source


def model_state_source(wildcards):
    copied = indexed_layout(save_of(wildcards)).layout.copy_files
    return {os.path.basename(path): path for path in copied}[wildcards.model_file]


def universal_files(save):
    """Every file of the save's universal checkpoint that finalize checks for."""
    copied = indexed_layout(save).layout.copy_files
    return (
        [
            f"{save.universal}/{ZERO}/{param}/{FP32_FILE}"
            for param in bucket_of_parameter(save)
        ]
        + [f"{save.universal}/{ZERO}/{OPTIMIZER_STATE_FILE}"]
        + [f"{save.universal}/{os.path.basename(path)}" for path in copied]
    )


def universal_outputs(wildcards):
    return universal_files(save_of(wildcards))


def indexed_universal_files(wildcards):
    """Every file of the universal checkpoints of the saves already indexed, for the targets: a file deleted
    since is converted again (finalize, whose summary is up to date, would not ask for it). A save not yet
    indexed is left to its finalize, so that one index holds back no other save."""
    return [
        path for save in SAVES if is_indexed(save) for path in universal_files(save)
    ]


def verified_saves(wildcards):
    """What the verify job checks, save by save: index files, extraction maps, universal folder, and the
    latest_universal file for the save it names (None for a run's older saves)."""
    return [
        dict(
            tag=save.tag,
            index=index_output(save)._asdict(),
            maps=save_maps(save),
            output_folder=save.universal,
            latest=LATEST_UNIVERSAL_FILE if save == SAVES[-1] else None,
        )
        for save in SAVES
    ]


def finished_conversions(wildcards):
    """Every save's finalize summary and latest_universal: known before any index, so that every save's
    conversion starts at once."""
    summaries = [summary_of(save) for save in SAVES]
    return summaries + ([LATEST_UNIVERSAL_FILE] if SAVES else [])


def verify_inputs(wildcards):
    files = []
    for save in verified_saves(wildcards):
        files += list(save["index"].values()) + save["maps"]
    return files


def _read_bucket_sizes(path):
    sizes = {}
    for row in read_parameters(path):
        size = sizes.setdefault(row.bucket, {"bytes": 0, "largest": 0})
        size["bytes"] += row.bytes
        size["largest"] = max(size["largest"], row.numel * 4)
    return sizes


def bucket_sizes(wildcards):
    """{bucket: {"bytes", "largest"}} of the job's save, from its index."""
    params = index_output(save_of(wildcards)).params
    return _read_index_file(params, _read_bucket_sizes)


def merge_mem_mb(wildcards):
    """A merge holds one parameter at a time: its fragments, the merged tensor and the write buffer."""
    return job_memory_mb(4 * bucket_sizes(wildcards)[wildcards.bucket]["largest"])


def merge_runtime(wildcards):
    """Minutes for a bucket at a pessimistic 50 MB/s of universal output, plus start-up."""
    return job_runtime_minutes(bucket_sizes(wildcards)[wildcards.bucket]["bytes"])


def _all_bucket_sizes():
    sizes = []
    for save in SAVES:
        params = index_output(save).params
        sizes += _read_index_file(params, _read_bucket_sizes).values()
    return sizes


def verify_mem_mb(wildcards, threads):
    """Each of the verify job's processes holds one parameter's source slices at a time, as a merge does."""
    largest = max((size["largest"] for size in _all_bucket_sizes()), default=0)
    return BASE_MEMORY_MB + threads * math.ceil(4 * largest / 2**20)


def verify_runtime(wildcards):
    """Minutes to read every save's source fragments and universal files once each, at a pessimistic 50 MB/s."""
    return job_runtime_minutes(2 * sum(size["bytes"] for size in _all_bucket_sizes()))


def inspected_output_folders():
    """The output folders the `inspect` of a run folder reports on (ucpflow.runs.OutputFolders): the roots of
    every save's folders when `tags` chooses saves, else the config's keys."""
    if SETTINGS.many:
        return dict(
            output_folder=SETTINGS.output_folder,
            hf_folder=SETTINGS.hf_folder,
            megatron_folder=SETTINGS.megatron_folder,
            reshard_folder=SETTINGS.reshard_folder,
            per_save=True,
        )
    return dict(
        output_folder=config["output_folder"],
        hf_folder=config["hf_folder"],
        megatron_folder=config["megatron_folder"],
        reshard_folder=config["reshard_folder"],
        converted_save="" if SETTINGS.unconvertible else SETTINGS.tag_folder,
    )


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
    save = save_of(wildcards)
    run_in_process(
        log_path,
        publish,
        wildcards.param,
        input.staged,
        save.universal,
        _parameter_files(save)[wildcards.param],
        parameter_bucket(wildcards),
        index_of(save),
        parameter_maps(wildcards),
    )


def _written_in_this_run(path):
    path = Path(path)
    return path.is_file() and path.stat().st_mtime >= STARTED


def print_conversion_summary():
    """The last line of each target that finished its output in this run: what, where, what next."""
    seconds = time.time() - STARTED
    lines = []
    for save in SAVES:
        summary = summary_of(save)
        if _written_in_this_run(summary):
            lines.append(summary_line(json.loads(Path(summary).read_text()), seconds))
        if _written_in_this_run(f"{save.megatron}/{MEGATRON_TRACKER}"):
            tp, pp = config["target_tp"], config["target_pp"]
            lines.append(megatron_summary_line(save.megatron, tp, pp, seconds))
        if _written_in_this_run(f"{save.hf}/config.json"):
            lines.append(hf_summary_line(save.hf, seconds))
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
