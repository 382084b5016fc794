"""`snakemake reshard`: a native DeepSpeed checkpoint for another data-parallel degree, ZeRO stage or precision,
written from the source's rank files (through the index and the extraction maps, as the universal conversion's
merge stage reads them), without writing a universal checkpoint.

Modules, each importing only those above it: `plan` (DeepSpeed's partition arithmetic), `source` (what the
source checkpoint holds, and the reader of its parameters' states), `carry` (the HF Trainer's side files),
`write` (the rank files), `overview` (what a reshard would write), `jobs` (the workflow's jobs).
"""
