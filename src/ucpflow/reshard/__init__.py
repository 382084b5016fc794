"""`snakemake reshard`: a native DeepSpeed checkpoint for another data-parallel degree, ZeRO stage or precision,
written from the universal output.

Modules, each importing only those above it: `plan` (DeepSpeed's partition arithmetic), `source` (what the
universal checkpoint holds), `carry` (the HF Trainer's side files), `write` (the rank files), `overview`
(what a reshard would write), `jobs` (the workflow's jobs).
"""
