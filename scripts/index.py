"""Rule `index`: read the checkpoint's metadata into the fragment table and the merge plan."""

from ucpflow.smk import named_index_files, run
from ucpflow.stages.index import index_job


def main():
    layout, params = index_job(
        snakemake.params.input_folder,
        snakemake.params.output_folder,
        named_index_files(snakemake.output),
        strict=snakemake.params.strict,
        inject_missing_state=snakemake.params.inject_missing_state,
        job_bytes=snakemake.params.merge_job_bytes,
        min_jobs=snakemake.params.merge_min_jobs,
        model_config=snakemake.params.hf_config,
    )
    line = (f"{layout.folder}: ZeRO stage {layout.zero_stage}, pp={layout.pp_degree} tp={layout.tp_degree} "
            f"dp={layout.dp_degree}, {len(layout.rank_files)} rank files, {len(params)} parameters "
            f"in {len({p.bucket for p in params})} merge jobs")
    return line


run(snakemake, main, announce=True)
