"""`snakemake inspect`, `python -m ucpflow.inspect FILE` and `snakemake --report` after a conversion."""

import subprocess
import sys

import pandas as pd
from conftest import REPO, convert, copy_tag, snakemake

DEMO = dict(num_procs=2, zero_stage=1, dtype="bf16")


def inspect(workdir, input_folder, output_folder):
    inspect_folder = workdir / "inspect"
    result = snakemake(
        workdir, "inspect",
        config={"input_folder": input_folder, "output_folder": output_folder, "inspect_folder": inspect_folder},
        check=True,
    )
    return inspect_folder, result


def test_inspect_lists_files_parameters_and_degrees(deepspeed_checkpoint, tmp_path):
    tag = copy_tag(deepspeed_checkpoint("z1_bf16_dp2", **DEMO), tmp_path / "checkpoint")
    folder, result = inspect(tmp_path / "run", tag, tmp_path / "out" / "u")
    assert "ZeRO stage 1, pp=1 tp=1 dp=2, 2 optimizer files" in result.stdout
    assert "Ready to convert." in result.stdout
    files = pd.read_csv(folder / "files.csv")
    assert sorted(files["file"]) == sorted(p.name for p in tag.iterdir())
    assert dict(zip(files["file"], files["kind"]))["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"] == "optimizer"
    parameters = pd.read_csv(folder / "parameters.csv")
    assert "wte.weight" in set(parameters["param"])
    wte = parameters.set_index("param").loc["wte.weight"]
    assert (wte["shape"], wte["dtype"], wte["numel"]) == ("500x64", "bfloat16", 32000)
    summary = pd.read_csv(folder / "summary.csv").set_index("item")["value"]
    assert int(summary["parameters"]) == len(parameters) and int(summary["dp_degree"]) == 2
    assert not (tmp_path / "out" / "u").exists(), "inspect must not convert"


def test_inspect_reports_what_blocks_conversion(deepspeed_checkpoint, tmp_path):
    tag = copy_tag(deepspeed_checkpoint("z1_bf16_dp2", **DEMO), tmp_path / "checkpoint")
    (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    folder, result = inspect(tmp_path / "run", tag, tmp_path / "out" / "u")
    assert "Conversion is blocked" in result.stdout
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in (folder / "summary.md").read_text()


def test_inspect_megatron_tensor_and_pipeline_parallel(megatron_checkpoint, tmp_path):
    tag = megatron_checkpoint("t2p2d2", tp=2, pp=2, dp=2)
    folder, _ = inspect(tmp_path / "run", tag, tmp_path / "out" / "u")
    parameters = pd.read_csv(folder / "parameters.csv").set_index("param")
    embedding = parameters.loc["tied_modules.embed.word_embeddings.weight"]
    assert embedding["tp_merge"] == "column_parallel + vocabulary" and embedding["shape"] == "100x32"
    assert parameters.loc["2.self_attention.dense.weight", "tp_merge"] == "row_parallel"
    assert parameters.loc["2.input_layernorm.weight", "tp_merge"] == "replicated"
    assert set(parameters["pp_stage"]) == {0, 1}
    args = pd.read_csv(folder / "args.csv").set_index("arg")["value"]
    assert args["tensor_model_parallel_size"] == "2"


def test_single_file_key_tree(deepspeed_checkpoint):
    tag = deepspeed_checkpoint("z1_bf16_dp2", **DEMO)
    result = subprocess.run(
        [sys.executable, "-m", "ucpflow.inspect", str(tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert "single_partition_of_fp32_groups: list[1]" in result.stdout
    assert "tensor float32 [" in result.stdout
    assert "fragment_address(numel=" in result.stdout


def test_report_after_conversion(deepspeed_checkpoint, tmp_path):
    tag = copy_tag(deepspeed_checkpoint("z1_bf16_dp2", **DEMO), tmp_path / "checkpoint")
    config = {"input_folder": tag, "output_folder": tmp_path / "out" / "u"}
    convert(tmp_path / "run", tag, tmp_path / "out" / "u")
    snakemake(tmp_path / "run", "--report", str(tmp_path / "report.html"), config=config, check=True)
    html = (tmp_path / "report.html").read_text()
    for expected in ("parameter_bytes.svg", "summary.md", "merge", "index"):
        assert expected in html
