"""What Snakemake itself costs for a conversion's number of parameters, with no conversion work at all:

    python -m bench.floor [--parameters 581] [--repeats 3] [--out DIR]

A generated workflow has the shape of ucpflow's merge and publish stages: one job stages N empty files,
then N local jobs, run in Snakemake's process as ucpflow's `publish` jobs are, hard-link one file each
into `zero/<name>/fp32.pt`. It runs under ucpflow's default profile, once with N parameters and once with
one; the difference divided by N - 1 is Snakemake's cost per per-parameter job on this machine. Like
ucpflow's Snakefile, it exits as soon as its last job is done (ucpflow.smk.exit_without_waiting). Compare
the N-parameter wall time with `python -m bench`'s ds_to_universal row for the same N (581 for `many`).
Writes <out>/floor.json.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.measure import run_measured

REPO = Path(__file__).resolve().parents[1]

SNAKEFILE = '''
NAMES = [f"p{{i}}" for i in range({parameters})]


rule all:
    input:
        expand("out/zero/{{name}}/fp32.pt", name=NAMES),


rule stage:
    output:
        directory("out/tmp/b0"),
    log:
        "logs/stage.log",
    run:
        for name in NAMES:
            Path(output[0], name).mkdir(parents=True)
            Path(output[0], name, "fp32.pt").touch()


rule publish:
    input:
        "out/tmp/b0",
    output:
        "out/zero/{{name}}/fp32.pt",
    log:
        "logs/publish/{{name}}.log",
    localrule: True
    threads: 0
    run:
        os.link(f"{{input[0]}}/{{wildcards.name}}/fp32.pt", output[0])


onsuccess:
    exit_without_waiting()
'''


def timed_run(parameters, scratch, log_path):
    """Wall seconds of one run of the generated workflow with `parameters` publish jobs, from scratch."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "Snakefile").write_text("import os\nfrom pathlib import Path\n\nfrom ucpflow.smk import exit_without_waiting\n"
                                       + SNAKEFILE.format(parameters=parameters))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(scratch / "Snakefile"), "--directory",
               str(scratch), "--cores", "2", "--workflow-profile", str(REPO / "profiles" / "default")]
    measured = run_measured(command, log_path=log_path, cwd=scratch)
    if measured.returncode != 0:
        raise SystemExit(f"[bench.floor] the generated workflow failed; see {log_path}")
    return measured.wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=581)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    walls = {args.parameters: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="ucpflow-floor-") as scratch:
        for repeat in range(args.repeats):
            for count in walls:
                wall = timed_run(count, Path(scratch) / "run", args.out / f"floor-{count}-{repeat}.log")
                walls[count].append(wall)
                print(f"[bench.floor] {count} parameters: {wall:.2f} s", flush=True)
    many, one = (statistics.median(walls[count]) for count in (args.parameters, 1))
    result = {
        "parameters": args.parameters,
        "wall_s_median": round(many, 2),
        "wall_s_one_parameter_median": round(one, 2),
        "ms_per_parameter_job": round(1000 * (many - one) / max(args.parameters - 1, 1), 2),
        "walls": walls,
    }
    (args.out / "floor.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"[bench.floor] Snakemake alone: {many:.2f} s for {args.parameters} parameter jobs, {one:.2f} s for one; "
          f"{result['ms_per_parameter_job']} ms per job. Wrote {args.out / 'floor.json'}")


if __name__ == "__main__":
    main()
