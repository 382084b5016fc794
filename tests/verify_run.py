"""verify() called in the test process on a finished conversion (faster than the `verify` target)."""

from ucpflow.source.signature import derived_folder
from ucpflow.tables import index_files
from ucpflow.verify import failure, verify


def verify_conversion(work, output):
    """(report rows, partition rows, error sentence or None) of the universal checkpoint `output`,
    checked against the index and extraction maps in the work folder `work`."""
    derived = derived_folder(work)
    report, partitions, _ = verify(
        index_files(str(derived / "index")), sorted((derived / "extract").glob("*.tsv")), output,
        output.parent / "latest_universal",
    )
    return report, partitions, failure(report, partitions, "verify.log")
