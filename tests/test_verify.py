"""`snakemake verify` checks a universal checkpoint against the source fragments, for users who cannot
run DeepSpeed's converter: it passes on good conversions (ZeRO-1/2/3, Megatron TP x PP with replicated,
row-parallel, vocabulary-padded, averaged and sub-parameter tensors) and names the parameter of an
altered, moved or deleted element, a wrong shape or metadata key, or a changed optimizer_state.pt entry."""

import csv
import shutil
import time

import pytest
import torch
from conftest import convert, snakemake
from verify_run import verify_conversion

from ucpflow.tables import index_files
from ucpflow.verify import verify
from ucpflow.source.signature import derived_folder

CASES = {
    "zero1_dp2": ("deepspeed", "z1_bf16_dp2", dict(num_procs=2, zero_stage=1, dtype="bf16")),
    "zero2_dp2": ("deepspeed", "z2_fp32_dp2", dict(num_procs=2, zero_stage=2, dtype="fp32")),
    "zero3_dp2": ("deepspeed", "z3_bf16_dp2", dict(num_procs=2, zero_stage=3, dtype="bf16")),
    "megatron_tp2_dp2": ("megatron", "t2p1d2", dict(tp=2, pp=1, dp=2)),
    "megatron_tp2_pp2_dp2": ("megatron", "t2p2d2", dict(tp=2, pp=2, dp=2)),
    "megatron_swiglu_average": ("megatron", "t2p2d1_swiglu_average",
                                dict(tp=2, pp=2, dp=1, swiglu=True, partial_output_scale=True)),
    "megatron_gqa_sub_params": ("megatron", "t2p1d1_gqa_blocks",
                                dict(tp=2, pp=1, dp=1, qkv_layout="blocks", heads=6, kv_heads=3, hidden=48)),
}  # fmt: skip
# Checked through the `verify` target; the others by calling verify() on their conversion.
TARGET_CASES = ["zero1_dp2", "megatron_tp2_dp2"]
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
        started = time.perf_counter()
        convert(root / "run", tag, self.output, work_folder=self.work)
        self.seconds = time.perf_counter() - started

    def verify_target(self):
        """Run the verify target (again, even if it ran before)."""
        return snakemake(self.root / "run", "verify", "--forcerun", "verify", config=self.config)

    def verify(self):
        """verify() in this process: (report rows, partition rows, error sentence or None)."""
        return verify_conversion(self.work, self.output)

    def table(self, name):
        with open(self.work / "verify" / name, newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def converted(deepspeed_checkpoint, megatron_checkpoint, tmp_path_factory):
    """converted(case) -> the Conversion of that case's checkpoint, made once per module."""
    conversions = {}

    def get(case):
        if case not in conversions:
            kind, name, spec = CASES[case]
            build = deepspeed_checkpoint if kind == "deepspeed" else megatron_checkpoint
            conversions[case] = Conversion(tmp_path_factory.mktemp(case), build(name, **spec))
        return conversions[case]

    return get


class altered_file:
    """Change a .pt file of a conversion with `change(loaded object)` (None: delete it); restored on exit."""

    def __init__(self, conversion, path, change):
        self.path, self.change = path, change
        self.backup = conversion.root / "backup" / path.relative_to(conversion.output)

    def __enter__(self):
        self.backup.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.path, self.backup)
        if self.change is None:
            self.path.unlink()
            return
        state = torch.load(self.path, weights_only=False)
        self.change(state)
        torch.save(state, self.path)

    def __exit__(self, *exc):
        shutil.copy2(self.backup, self.path)


@pytest.mark.parametrize("case", TARGET_CASES)
def test_verify_target_passes_on_a_good_conversion(case, converted):
    conversion = converted(case)
    result = conversion.verify_target()

    assert result.returncode == 0, result.stderr[-3000:]
    report = conversion.table("report.tsv")
    assert report and {row["status"] for row in report} == {"ok"}
    checked = {(row["param"], row["state"]) for row in report}
    for path in (conversion.output / "zero").glob("*/*.pt"):
        assert (path.parent.name, path.stem) in checked
    assert {"param_groups", "ds_version"} <= {state for param, state in checked if param == "optimizer_state.pt"}
    partitions = conversion.table("partitions.tsv")
    assert partitions and all(row["problem"] == "" for row in partitions)
    assert "ucpflow verify: " in result.stderr
    summary = (conversion.work / "verify" / "summary.txt").read_text()
    assert f"{len(report)} checks ({len(report)} ok)" in summary


@pytest.mark.parametrize("case", sorted(set(CASES) - set(TARGET_CASES)))
def test_verify_passes_on_other_layouts(case, converted):
    conversion = converted(case)
    report, partitions, error = conversion.verify()

    assert error is None, [row for row in report if row["status"] != "ok"][:5]
    checked = {(row["param"], row["state"]) for row in report}
    files = list((conversion.output / "zero").glob("*/*.pt"))
    assert files and all((path.parent.name, path.stem) in checked for path in files)
    assert partitions and all(row["problem"] == "" for row in partitions)
    # The rule-specific metadata is checked, not just present: every merged fp32 row names its keys.
    metadata = {row["expected"].split("}")[0] for row in report if row["state"] == "fp32"}
    expected_keys = {
        "megatron_tp2_pp2_dp2": "vocab_tensor=True", "megatron_swiglu_average": "param_n_sub_params=2",
        "megatron_gqa_sub_params": "sub_param_shape=deepspeed.checkpoint.universal_checkpoint.SubparamShape(",
        "zero2_dp2": "{cat_dim=0, param", "zero3_dp2": "float32(",
    }[case]  # fmt: skip
    assert any(expected_keys in text for text in metadata)


def _swap_halves(state):
    flat = state["param"].reshape(-1)
    half = flat.numel() // 2
    state["param"] = torch.cat([flat[half:], flat[:half]]).reshape(state["param"].shape)


def _swap_tp_column_slices(state):
    param = state["param"]
    half = param.shape[1] // 2
    state["param"] = torch.cat([param[:, half:], param[:, :half]], dim=1)


def _set_cat_dim_1(state):
    state["cat_dim"] = 1


def _transpose(state):
    state["param"] = state["param"].t().contiguous()


def _keep_vocab_padding(state):
    state["param"] = torch.cat([state["param"], torch.zeros(12, state["param"].shape[1])])


def _drop_vocab_flag(state):
    del state["vocab_tensor"]


def _double_lr(state):
    state["param_groups"][0]["lr"] *= 2


def _change_betas(state):
    state["param_groups"][0]["betas"] = (0.5, 0.5)


MUTATIONS = {
    # name: (case, parameter folder or optimizer_state.pt, state file, change, status named)
    "permuted_elements": ("zero1_dp2", "blocks.1.attn.qkv.weight", "fp32", _swap_halves, "mismatch"),
    "permuted_exp_avg": ("zero1_dp2", "wte.weight", "exp_avg", _swap_halves, "mismatch"),
    "transposed_square_weight": ("zero1_dp2", "blocks.0.attn.proj.weight", "fp32", _transpose, "mismatch"),
    "swapped_tp_slices_row_parallel": ("megatron_tp2_dp2", "2.self_attention.dense.weight", "fp32",
                                       _swap_tp_column_slices, "mismatch"),
    "swapped_tp_slices_column_parallel": ("megatron_tp2_dp2", "2.mlp.dense_h_to_4h.weight", "exp_avg_sq",
                                          _swap_halves, "mismatch"),
    "wrong_cat_dim": ("megatron_tp2_dp2", "2.mlp.dense_h_to_4h.weight", "fp32", _set_cat_dim_1, "wrong_metadata"),
    "vocabulary_padding_kept": ("megatron_tp2_dp2", "tied_modules.embed.word_embeddings.weight", "fp32",
                                _keep_vocab_padding, "wrong_shape"),
    "vocabulary_flag_missing": ("megatron_tp2_dp2", "tied_modules.embed.word_embeddings.weight", "exp_avg",
                                _drop_vocab_flag, "wrong_metadata"),
    "optimizer_lr": ("zero1_dp2", "optimizer_state.pt", "param_groups", _double_lr, "mismatch"),
    "optimizer_betas": ("megatron_tp2_dp2", "optimizer_state.pt", "param_groups", _change_betas, "mismatch"),
}  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_verify_names_a_mutated_file(mutation, converted):
    case, param, state, change, status = MUTATIONS[mutation]
    conversion = converted(case)
    zero = conversion.output / "zero"
    path = zero / param if param == "optimizer_state.pt" else zero / param / f"{state}.pt"

    with altered_file(conversion, path, change):
        report, _, error = conversion.verify()

    assert error is not None and error.startswith(f"Verification failed for {param} ({state}: {status})"), error
    assert [row["param"] for row in report if row["status"] != "ok"] == [param]


def test_verify_names_an_altered_parameter(converted):
    conversion = converted("megatron_tp2_dp2")
    param = ALTERED["megatron_tp2_dp2"]

    def add_one(state):
        state["param"].view(-1)[0] += 1

    with altered_file(conversion, conversion.output / "zero" / param / "exp_avg.pt", add_one):
        result = conversion.verify_target()

    assert result.returncode != 0
    [error] = [line for line in result.stderr.splitlines() if line.startswith("ucpflow error:")]
    assert error.startswith(f"ucpflow error: Verification failed for {param} (exp_avg: mismatch);")


@pytest.mark.parametrize("case", TARGET_CASES)
def test_verify_names_a_deleted_parameter_file(case, converted):
    conversion = converted(case)
    with altered_file(conversion, conversion.output / "zero" / ALTERED[case] / "fp32.pt", None):
        _, _, error = conversion.verify()

    assert error.startswith(f"Verification failed for {ALTERED[case]} (fp32: missing);")


def test_partitions_left_uncovered_or_covered_twice_are_reported(converted, tmp_path):
    conversion = converted("zero1_dp2")
    index = derived_folder(conversion.work) / "index"
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
        index_files(str(index))._replace(fragments=str(tmp_path / "fragments.tsv")),
        sorted((derived_folder(conversion.work) / "extract").glob("*.tsv")), conversion.output,
        conversion.output.parent / "latest_universal",
    )

    problems = {(row["file"], row["tensor"]): row["problem"] for row in partitions if row["problem"]}
    start, end = int(dropped["offset"]), int(dropped["offset"]) + int(dropped["numel"])
    assert f"elements [{start}, {end}) belong to no parameter" in problems[(dropped["file"], dropped["tensor"])]
    overlap = f"{doubled['param']} and {doubled['param']} overlap at element {doubled['offset']}"
    assert overlap in problems[(doubled["file"], doubled["tensor"])]


def test_verify_time_is_small_next_to_the_conversion(converted):
    conversion = converted("megatron_tp2_dp2")
    started = time.perf_counter()
    _, _, error = conversion.verify()
    seconds = time.perf_counter() - started

    assert error is None
    print(f"verify {seconds:.2f} s, conversion {conversion.seconds:.2f} s ({seconds / conversion.seconds:.2f}x)")
    assert seconds < conversion.seconds
