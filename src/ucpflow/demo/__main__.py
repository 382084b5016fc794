"""python -m ucpflow.demo --save-dir DIR [options]: build a real DeepSpeed checkpoint of the demo GPT.

With no options it builds the default demo (DEFAULT_DEMO_SPEC); prints the tag folder it wrote.
"""

import argparse
import sys
from pathlib import Path

from ucpflow.demo import DEFAULT_DEMO_SPEC
from ucpflow.demo.launch import build_checkpoint
from ucpflow.demo.train import add_model_arguments, add_training_arguments
from ucpflow.errors import UcpflowError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ucpflow.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-dir", type=Path, required=True, help="checkpoint root to create")
    parser.add_argument("--num-procs", type=int, default=DEFAULT_DEMO_SPEC["num_procs"],
                        help="DeepSpeed processes, hence the data-parallel degree")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the run is stopped")
    add_model_arguments(parser)
    add_training_arguments(parser)
    options = vars(parser.parse_args(argv))
    save_dir, num_procs, timeout = options.pop("save_dir"), options.pop("num_procs"), options.pop("timeout")
    try:
        tag_folder = build_checkpoint(save_dir, num_procs=num_procs, timeout=timeout, **options)
    except UcpflowError as error:
        print(f"ucpflow: {error}", file=sys.stderr)
        return 1
    print(tag_folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
