"""What each workflow rule does, as plain functions of paths and parameters (the scripts in scripts/
only unpack `snakemake` and call these), so every step can be tested and reused without Snakemake."""

from .common import (
    MODEL_STATES_SUFFIX,
    OPTIMIZER_STATE_FILE,
    STAGING,
    ZERO,
    Fragment,
    load_layout,
    load_universal_info,
    read_fragments,
    read_table,
    source_name,
)
from .demo import demo_checkpoint_job
from .extract import extract_job
from .files import copy_model_state_job, optimizer_state_job
from .index import (
    check_output_folder,
    index_job,
    optimizer_state_source,
    remove_other_derivations,
    report_tables_job,
    source_kinds,
)
from .merge import (
    BucketMerger,
    merge_job,
    publish_job,
    remove_partial_folders,
    source_name_of,
)

__all__ = [
    "BucketMerger",
    "Fragment",
    "MODEL_STATES_SUFFIX",
    "OPTIMIZER_STATE_FILE",
    "STAGING",
    "ZERO",
    "check_output_folder",
    "copy_model_state_job",
    "demo_checkpoint_job",
    "extract_job",
    "index_job",
    "load_layout",
    "load_universal_info",
    "merge_job",
    "optimizer_state_job",
    "optimizer_state_source",
    "publish_job",
    "read_fragments",
    "read_table",
    "remove_other_derivations",
    "remove_partial_folders",
    "report_tables_job",
    "source_kinds",
    "source_name",
    "source_name_of",
]
