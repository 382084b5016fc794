"""Untrusted checkpoints: no code from a checkpoint runs, and none is carried forward.

Six payload kinds, planted into copies of real DeepSpeed files (optimizer, model-states and pipeline layer
files), are refused with a sentence naming their global by ptfile, `python -m ucpflow.inspect FILE`, the
conversion, `snakemake inspect`, `verify`, `megatron` and `hf`; none of them runs, and no file ucpflow wrote
runs anything under `torch.load(weights_only=False)`. Real saves of every kind the suite builds pass the
allowlist, and hostile sizes fail in one sentence without exhausting memory."""

import pickletools
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import REPO, convert, copy_tag, snakemake
from export_cases import PER_HEAD_TP2_PP2, Converted
from payloads import PAYLOADS, plant

from ucpflow import ptfile
from ucpflow.ptfile import allowlist
from ucpflow.errors import CheckpointError

OPTIM = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
FILE_KINDS = {  # a file of each kind of the TP2 x PP2 Megatron checkpoint, and where the payload goes
    "optimizer": (OPTIM, ("optimizer_state_dict", "payload")),
    "model_states": ("mp_rank_00_model_states.pt", ("args", "seed")),  # nested inside Megatron's args
    "layer": ("layer_01-model_00-model_states.pt", ("payload",)),
}


@pytest.fixture(scope="module")
def megatron_tag(megatron_checkpoint):
    return megatron_checkpoint(PER_HEAD_TP2_PP2[0], **PER_HEAD_TP2_PP2[1])


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@pytest.mark.parametrize("file_kind", sorted(FILE_KINDS))
def test_each_payload_in_each_file_kind_is_refused_unrun(kind, file_kind, megatron_tag, tmp_path):
    name, key_path = FILE_KINDS[file_kind]
    path, marker = tmp_path / name, tmp_path / "ran"
    shutil.copy(megatron_tag / name, path)
    planted_global = plant(path, key_path, kind, marker)
    with pytest.raises(ptfile.UntrustedGlobalError, match=f"`{planted_global}`") as refused:
        ptfile.load(path)
    assert str(refused.value).count(".") >= 1 and len(str(refused.value).splitlines()) == 1
    if file_kind == "model_states":  # the command-line key tree refuses too, naming the global
        result = subprocess.run([sys.executable, "-m", "ucpflow.inspect", str(path)], capture_output=True, text=True,
                                cwd=REPO)
        assert result.returncode == 1 and planted_global in result.stderr
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: torch runs it
    assert marker.exists()


PLANTS = [  # one folder, every payload kind, in every kind of file (file, key path, payload)
    (OPTIM, ("optimizer_state_dict", "payload"), "os_system"),
    ("bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt", ("optimizer_state_dict", "payload"), "setstate_build"),
    ("mp_rank_00_model_states.pt", ("args", "seed"), "builtins_eval"),
    ("mp_rank_01_model_states.pt", ("args", "seed"), "getattr_chain"),
    ("layer_01-model_00-model_states.pt", ("payload",), "builtins_exec"),
    ("layer_02-model_01-model_states.pt", ("payload",), "subprocess"),
]


def plant_all(tag, marker):
    return {plant(tag / name, key_path, kind, marker) for name, key_path, kind in PLANTS}


def error_line(result):
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("ucpflow error:")]
    assert result.returncode != 0 and lines, result.stderr[-3000:]
    return lines[0]


def written_files(*folders):
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.suffix in (".pt", ".pkl")]


def test_every_target_refuses_a_planted_folder_and_nothing_written_runs(megatron_checkpoint, tmp_path):
    name, spec = PER_HEAD_TP2_PP2
    source = copy_tag(megatron_checkpoint(name, **spec), tmp_path / "source")  # its files are swapped below
    universal = tmp_path / "converted" / "universal" / f"{source.name}_universal"
    convert(tmp_path / "converted", source, universal)
    converted = Converted(tmp_path / "converted", source, universal)
    clean = written_files(converted.universal, converted.workdir)
    assert any(p.name == "optimizer_state.pt" for p in clean) and any(p.suffix == ".pkl" for p in clean)
    assert all(allowed_globals_only(path) for path in clean)
    tag = copy_tag(converted.tag, tmp_path / "planted")
    marker = tmp_path / "ran"
    planted = plant_all(tag, marker)
    assert len(planted) == 6

    # A fresh conversion: the index names every planted global (file, key path) and converts nothing.
    fresh = tmp_path / "fresh" / "u"
    message = error_line(snakemake(tmp_path / "fresh", config={"input_folder": tag, "output_folder": fresh}))
    assert "6 checkpoint files hold globals outside ucpflow's allowlist" in message and " more;" in message
    assert not fresh.exists()
    log = next((tmp_path / "fresh").glob("ucpflow-work/*/logs/*/index.log")).read_text()
    rows = [line.split("\t")[1:] for line in log.splitlines() if line.startswith("untrusted global\t")]
    for name, key_path, kind in PLANTS:  # the setstate trick sits one key deeper, in the Namespace's __dict__
        assert any(row[0] == str(tag / name) and row[1].startswith(".".join(key_path)) and row[2] == PAYLOADS[kind][1]
                   for row in rows), (name, rows)

    # snakemake inspect reports each of them and blocks.
    inspect = snakemake(tmp_path / "fresh", "inspect", config={"input_folder": tag, "output_folder": fresh}, check=True)
    assert "Conversion is blocked" in inspect.stdout and "Ready to convert" not in inspect.stdout
    for name in planted:
        assert f"`{name}`" in inspect.stdout

    # The converted folder's inputs swapped for the planted files: each target reruns what reads them and stops.
    for path in tag.iterdir():
        shutil.copy(path, converted.tag / path.name)
    config = {"input_folder": converted.tag, "output_folder": converted.universal}
    for target in (["verify", "--forcerun", "verify"], ["megatron"], ["hf"], []):
        message = error_line(snakemake(converted.workdir, *target, config=config))
        assert "allowlist" in message and any(f"`{name}`" in message for name in planted), (target, message)

    outputs = written_files(converted.universal, converted.workdir / "megatron", tmp_path / "fresh", converted.workdir)
    # The refused inputs' index removed the earlier input's tables (their .pkl was checked above as `clean`).
    assert any(p.name == "optimizer_state.pt" for p in outputs)
    for path in outputs:
        torch.load(path, weights_only=False)
        assert allowed_globals_only(path), path
    assert not marker.exists()


def pickle_globals(path):
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    names, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return names


def allowed_globals_only(path):
    return all(allowlist.is_allowed(name) for name in pickle_globals(path))


REAL_SAVES = {  # every kind of checkpoint the suite builds (the same fixtures as the tests that convert them)
    "zero1_bf16": ("deepspeed", "z1_bf16_dp2", dict(num_procs=2, zero_stage=1, dtype="bf16")),
    "zero3_bf16": ("deepspeed", "z3_bf16_dp2", dict(num_procs=2, zero_stage=3, dtype="bf16")),
    "zero2_fp32_frozen": ("deepspeed", "z2_fp32_frozen", dict(num_procs=2, zero_stage=2, dtype="fp32",
                                                              freeze=["wpe.weight"])),
    "megatron_tp2_pp2": ("megatron", PER_HEAD_TP2_PP2[0], PER_HEAD_TP2_PP2[1]),
    "megatron_zero_optimizer": ("megatron", "t2p1d2_zero_optimizer", dict(tp=2, pp=1, dp=2, grad_accum_dtype="bf16")),
    "autotp_llama_zero1": ("autotp", "llama_z1_bf16", dict(model="llama", tp=2, dp=2, zero_stage=1, dtype="bf16")),
    "autotp_phi3_zero3": ("autotp", "phi3_z3_fp32", dict(model="phi3", tp=2, dp=2, zero_stage=3, dtype="fp32")),
}


@pytest.mark.parametrize("case", sorted(REAL_SAVES))
def test_real_deepspeed_saves_pass_the_allowlist(case, deepspeed_checkpoint, megatron_checkpoint, autotp_checkpoint,
                                                 tmp_path):
    kind, name, spec = REAL_SAVES[case]
    builder = {"deepspeed": deepspeed_checkpoint, "megatron": megatron_checkpoint, "autotp": autotp_checkpoint}[kind]
    tag = builder(name, **spec)
    if case == "zero2_fp32_frozen":  # and its fp16 layout (dynamic loss scaler), as test_fp16_layout writes it
        from test_fp16_layout import rewrite_as_fp16

        tag = copy_tag(tag, tmp_path / "fp16")
        rewrite_as_fp16(tag)
    files = sorted(tag.glob("*.pt"))
    found = set()
    for path in files:
        findings = []
        ptfile.load(path, findings)
        assert findings == [], path
        found |= pickle_globals(path)
    assert found and all(name in allowlist.ALLOWED for name in found), sorted(found - allowlist.ALLOWED)
    assert "collections.OrderedDict" in found and "torch._utils._rebuild_tensor_v2" in found


def raw_checkpoint(path, data_pkl, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
    return path


HOSTILE = {
    # memo index 2**32 - 16: the unpickler would size its memo table at 64 GiB
    "memo": (b"\x80\x02}r\xf0\xff\xff\xff.", "more memory"),
    # a byte string claiming 2**40 bytes in a tiny pickle
    "claimed_bytes": (b"\x80\x03\x8e" + struct.pack("<Q", 1 << 40) + b"x.", "more memory"),
    # bytes(2**40) through an allowed global
    "allocation": (b"\x80\x02c__builtin__\nbytes\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R.", "bytes"),
    # 100000 nested tuples in 100 kB
    "nesting": (b"\x80\x02N" + b"\x85" * 100_000 + b".", "nested more than"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_sizes_fail_in_one_sentence(case, tmp_path):
    data, expected = HOSTILE[case]
    path = raw_checkpoint(tmp_path / "hostile.pt", data)
    with pytest.raises(CheckpointError, match=expected) as refused:
        ptfile.load(path)
    assert str(path) in str(refused.value) and "refused" in str(refused.value)


def test_a_compressed_data_pkl_and_a_tensor_larger_than_its_file_are_refused(tmp_path):
    bomb = raw_checkpoint(tmp_path / "bomb.pt", b"\x80\x02N." + b"\x00" * 10_000_000, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="compressed"):
        ptfile.load(bomb)
    huge = tmp_path / "huge.pt"
    torch.save({"w": torch.zeros(1).expand(1 << 40)}, huge)
    with pytest.raises(CheckpointError, match="larger than the whole"):
        ptfile.load(huge)


def test_ucpflow_writes_no_global_outside_the_allowlist(tmp_path):
    stand_in = ptfile.opaque_instance("posix", "system", {})
    with pytest.raises(CheckpointError, match="posix.system"):
        ptfile.save({"x": stand_in}, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_allow_globals_lets_a_named_global_through(megatron_tag, tmp_path, monkeypatch):
    path = tmp_path / OPTIM
    shutil.copy(megatron_tag / OPTIM, path)
    plant(path, ("optimizer_state_dict", "payload"), "subprocess", tmp_path / "ran")
    monkeypatch.setenv(allowlist.ENVIRONMENT_VARIABLE, "subprocess.check_call")
    assert ptfile.load(path)["optimizer_state_dict"]["payload"].opaque_qualname == "check_call"
    assert not (tmp_path / "ran").exists()
    result = snakemake(tmp_path / "run", config={"input_folder": tmp_path, "output_folder": tmp_path / "u",
                                                 "allow_globals": "[not a global]"})
    assert "allow_globals" in error_line(result)


def test_bounded_repr_shows_tuples_and_positional_arguments_whole():
    from ucpflow.ptfile.opaque import _opaque_class
    from ucpflow.ptfile.guard import bounded_repr

    stage = _opaque_class("deepspeed.runtime.zero.config", "ZeroStageEnum")(1)
    assert bounded_repr([(1, 2, 3), (4, 5), {"stage": stage}]) == (
        "[(1, 2, 3), (4, 5), {'stage': deepspeed.runtime.zero.config.ZeroStageEnum(1)}]"
    )
