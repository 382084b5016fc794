"""Test helpers for running workflows on a real single-node SLURM cluster."""
