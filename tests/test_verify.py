"""`snakemake verify` checks a universal checkpoint against the source fragments, for users who cannot
run DeepSpeed's converter: it passes on good conversions (ZeRO-1, and Megatron TP2 with replicated,
row-parallel and vocabulary-padded parameters) and names the parameter of an altered or deleted file."""

import csv

import pytest
import torch
from conftest import convert, snakemake

from ucpflow.verify import verify

CASES = {
    "zero1_dp2": ("deepspeed", "z1_bf16_dp2", dict(num_procs=2, zero_stage=1, dtype="bf16")),
    "megatron_tp2_dp2": ("megatron", "t2p1d2", dict(tp=2, pp=1, dp=2)),
}
# Per case: a parameter whose output is tp rank 0's slice (replicated) or a plain concatenation.
ALTERED = {
    "zero1_dp2": "blocks.1.attn.qkv.weight",
    "megatron_tp2_dp2": "2.input_layernorm.weight",
}


class Conversion:
    def __init__(self, root, tag):
        self.root = root
        self.output = root / "out" / f"{tag.name}_universal"
        self.work = root / "work"
        self.config = {"input_folder": tag, "output_folder": self.output, "work_folder": self.work}
        convert(root / "run", tag, self.output, work_folder=self.work)

    def verify(self):
        """Run the verify target (again, even if it ran before)."""
        return snakemake(self.root / "run", "verify", "--forcerun", "verify", config=self.config)

    def table(self, name):
        with open(self.work / "verify" / name, newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(params=sorted(CASES))
def conversion(request, deepspeed_checkpoint, megatron_checkpoint, tmp_path):
    kind, name, spec = CASES[request.param]
    build = deepspeed_checkpoint if kind == "deepspeed" else megatron_checkpoint
    return request.param, Conversion(tmp_path, build(name, **spec))


def test_verify_passes_on_a_good_conversion(conversion):
    case, conversion = conversion
    result = conversion.verify()

    assert result.returncode == 0, result.stderr[-3000:]
    report = conversion.table("report.tsv")
    assert report and {row["status"] for row in report} == {"ok"}
    checked = {(row["param"], row["state"]) for row in report}
    for path in (conversion.output / "zero").glob("*/*.pt"):
        assert (path.parent.name, path.stem) in checked
    partitions = conversion.table("partitions.tsv")
    assert partitions and all(row["problem"] == "" for row in partitions)
    assert "ucpflow verify: " in result.stderr
    summary = (conversion.work / "verify" / "summary.txt").read_text()
    assert f"{len(report)} checks ({len(report)} ok)" in summary


def test_verify_names_an_altered_parameter(conversion):
    case, conversion = conversion
    param = ALTERED[case]
    path = conversion.output / "zero" / param / "exp_avg.pt"
    state = torch.load(path, weights_only=False)
    state["param"].view(-1)[0] += 1
    torch.save(state, path)

    result = conversion.verify()

    assert result.returncode != 0
    [error] = [line for line in result.stderr.splitlines() if line.startswith("ucpflow error:")]
    assert error.startswith(f"ucpflow error: Verification failed for {param} (exp_avg: mismatch);")


def test_verify_names_a_deleted_parameter_file(conversion):
    case, conversion = conversion
    param = ALTERED[case]
    (conversion.output / "zero" / param / "fp32.pt").unlink()

    result = conversion.verify()

    assert result.returncode != 0
    assert f"ucpflow error: Verification failed for {param} (fp32: missing);" in result.stderr


def test_partitions_left_uncovered_or_covered_twice_are_reported(deepspeed_checkpoint, tmp_path):
    _, name, spec = CASES["zero1_dp2"]
    conversion = Conversion(tmp_path, deepspeed_checkpoint(name, **spec))
    index = conversion.work / "index"
    with open(index / "fragments.tsv", newline="") as handle:
        fragments = list(csv.DictReader(handle, delimiter="\t"))
    exp_avg = [row for row in fragments if row["state"] == "exp_avg" and int(row["numel"]) > 0]
    dropped, doubled = exp_avg[3], exp_avg[7]
    edited = [row for row in fragments if row is not dropped] + [doubled]
    with open(tmp_path / "fragments.tsv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fragments[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(edited)

    _, partitions, _ = verify(
        index / "layout.json", tmp_path / "fragments.tsv", index / "params.tsv", index / "universal_info.pkl",
        sorted((conversion.work / "extract").glob("*.tsv")), conversion.output,
        conversion.output.parent / "latest_universal",
    )  # fmt: skip

    problems = {(row["file"], row["tensor"]): row["problem"] for row in partitions if row["problem"]}
    start, end = int(dropped["offset"]), int(dropped["offset"]) + int(dropped["numel"])
    assert f"elements [{start}, {end}) belong to no parameter" in problems[(dropped["file"], dropped["tensor"])]
    overlap = f"{doubled['param']} and {doubled['param']} overlap at element {doubled['offset']}"
    assert overlap in problems[(doubled["file"], doubled["tensor"])]
