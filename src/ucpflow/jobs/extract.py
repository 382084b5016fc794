"""The extract stage: the map of one source file's tensors."""


def extract_job(source_path, kind, output):
    from ..extract import write_extraction

    write_extraction(source_path, kind, output)
