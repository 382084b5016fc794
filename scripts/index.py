"""Rule `index`: read the checkpoint's metadata into the fragment table and the merge plan."""

from ucpflow.jobs import index_job
from ucpflow.smk import run


def main():
    layout, params = index_job(
        snakemake.params.input_folder,
        snakemake.params.output_folder,
        dict(snakemake.output.items()),
        strict=snakemake.params.strict,
        inject_missing_state=snakemake.params.inject_missing_state,
        job_bytes=snakemake.params.merge_job_bytes,
        min_jobs=snakemake.params.merge_min_jobs,
        model_config=snakemake.params.hf_config,
    )
    print(f"{layout.folder}: ZeRO stage {layout.zero_stage}, pp={layout.pp_degree} tp={layout.tp_degree} "
          f"dp={layout.dp_degree}, {len(layout.rank_files)} rank files, {len(params)} parameters "
          f"in {params['bucket'].nunique()} merge jobs")


run(snakemake, main)
