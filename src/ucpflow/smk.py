"""Running a rule's script: its output goes to the rule's log, and a user error ends it with one sentence."""

import sys
import time
import traceback

from .errors import UcpflowError


def run(snakemake, main):
    """Call `main()` with stdout/stderr sent to the rule's log file.

    A UcpflowError (bad input, bad checkpoint) is reported as one line, both in the log and on the
    terminal, and exits with status 1; anything else keeps its traceback in the log.
    """
    terminal = sys.__stderr__
    rule = snakemake.rule
    with open(snakemake.log[0], "w") as log:
        sys.stdout = sys.stderr = log
        started = time.perf_counter()
        try:
            main()
        except UcpflowError as error:
            message = f"ucpflow error: {error}"
            print(message, file=log)
            print(message, file=terminal)
            sys.exit(1)
        except Exception as error:
            traceback.print_exc(file=log)
            print(f"ucpflow: rule {rule} failed with {type(error).__name__}: {error} (see {snakemake.log[0]})", file=terminal)
            sys.exit(1)
        print(f"rule {rule} done in {time.perf_counter() - started:.2f} s", file=log)
