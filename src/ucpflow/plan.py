"""Grouping parameters into merge jobs.

Every merge job is a fresh process that pays for its imports, so parameters are packed into a few
jobs of similar size (bytes of universal output). Parameters keep their checkpoint order, so a job
reads a contiguous stretch of each rank's flat optimizer tensors.
"""

import math


def bucket_name(index):
    return f"b{index:04d}"


def assign_buckets(params, *, job_bytes, min_jobs):
    """Return a copy of `params` with a `bucket` column: at least `min_jobs` jobs, none much above `job_bytes`."""
    params = params.copy()
    sizes = params["bytes"].clip(lower=1).tolist()
    total = sum(sizes)
    jobs = max(1, min(len(sizes), max(min_jobs, math.ceil(total / job_bytes))))
    target = total / jobs
    buckets = []
    index, filled = 0, 0.0
    for position, size in enumerate(sizes):
        remaining_params = len(sizes) - position
        remaining_jobs = jobs - index
        if filled > 0 and (filled + size / 2 > target or remaining_params < remaining_jobs) and index < jobs - 1:
            index, filled = index + 1, 0.0
        buckets.append(bucket_name(index))
        filled += size
    params["bucket"] = buckets
    return params


def bucket_sources(fragments, params):
    """{bucket: sorted source files its merge reads} (optimizer rank files and, for module weights, model files)."""
    bucket_of = dict(zip(params["param"], params["bucket"]))
    sources = {bucket: set() for bucket in params["bucket"].unique()}
    for param, path in zip(fragments["param"], fragments["file"]):
        if param in bucket_of:
            sources[bucket_of[param]].add(path)
    for bucket, path in zip(params["bucket"], params["source"]):
        if path:
            sources[bucket].add(path)
    return {bucket: sorted(files) for bucket, files in sources.items()}
