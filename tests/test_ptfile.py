"""ptfile reads and writes torch.save checkpoints without torch; torch itself is the referee here."""

import collections
import enum
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

import ptfile_helpers as helpers
from ucpflow import ptfile
from ucpflow.ptfile import allowlist
from ucpflow.demo.launcher import run_deepspeed
from ucpflow.errors import CheckpointError

HELPER_CLASSES = ["Fragment", "Stage", "Scaler", "Registry", "Outer", "Outer.Inner", "Sized"]


@pytest.fixture(autouse=True)
def allow_helper_classes(monkeypatch):
    """The stand-in classes of ptfile_helpers are no DeepSpeed globals: allow them as a user would."""
    monkeypatch.setenv(allowlist.ENVIRONMENT_VARIABLE, ",".join(f"ptfile_helpers.{name}" for name in HELPER_CLASSES))

SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def raw(tensor):
    """A tensor's elements as numpy, in ptfile's representation (bfloat16 as uint16 bits)."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def assert_ref_matches(ref, tensor):
    assert isinstance(ref, ptfile.TensorRef), ref
    assert ref.dtype == str(tensor.dtype).removeprefix("torch.")
    assert ref.shape == tuple(tensor.shape)
    assert ref.stride == tensor.stride()
    assert ref.storage_offset == tensor.storage_offset()
    assert ref.requires_grad == tensor.requires_grad
    assert ref.is_parameter == isinstance(tensor, torch.nn.Parameter)
    assert ref.is_contiguous == tensor.is_contiguous()
    assert ref.numel == tensor.numel() and ref.nbytes == tensor.numel() * tensor.element_size()
    np.testing.assert_array_equal(ref.read_array(), raw(tensor))
    if tensor.is_contiguous():
        np.testing.assert_array_equal(ref.read(), raw(tensor).reshape(-1))


def assert_structure_matches(ours, theirs):
    """ptfile.load's result mirrors torch.load's: TensorRef for tensors, Opaque for unknown objects."""
    if isinstance(theirs, torch.Tensor):
        assert_ref_matches(ours, theirs)
    elif isinstance(ours, ptfile.Opaque):
        assert (ours.opaque_module, ours.opaque_qualname) == (type(theirs).__module__, type(theirs).__qualname__)
        if isinstance(theirs, enum.Enum):
            assert int(ours) == theirs.value
        else:
            assert_structure_matches(ours.opaque_state, vars(theirs))
            for name, value in vars(theirs).items():
                assert_structure_matches(getattr(ours, name), value)
    elif isinstance(theirs, torch.Size):
        assert isinstance(ours, ptfile.Size) and ours == tuple(theirs)
    elif isinstance(theirs, torch.dtype):
        assert ours == ptfile.DType(str(theirs).removeprefix("torch."))
    elif isinstance(theirs, torch.device):
        assert isinstance(ours, ptfile.Device) and str(ours) == str(theirs)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs)
        for key in theirs:
            assert_structure_matches(ours[key], theirs[key])
        if isinstance(theirs, collections.OrderedDict):
            assert_structure_matches(vars(ours), vars(theirs))
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for mine, other in zip(ours, theirs):
            assert_structure_matches(mine, other)
    else:
        assert type(ours) is type(theirs) and ours == theirs


def assert_same(a, b):
    """Two torch.load results are equal: same types, tensor dtypes, shapes, flags and bits."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad)
        np.testing.assert_array_equal(raw(a), raw(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
        if hasattr(a, "__dict__"):  # OrderedDict._metadata, attributes of dict subclasses
            assert_same(vars(a), vars(b))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif hasattr(a, "__dict__") and not isinstance(a, (type, enum.Enum)):
        assert_same(vars(a), vars(b))
    else:
        assert a == b


def resave(source, target, **load_args):
    """save(load(source)) and torch.load the result."""
    ptfile.save(ptfile.load(source), target)
    return torch.load(target, **load_args)


# ---------------------------------------------------------------------------------------------
# Tensors


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ],
)
def test_tensor_round_trip(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator) * 100
    tensor = values.to(dtype) if dtype != torch.bool else values > 0
    original = {"weight": tensor, "scalar": tensor[2, 3].clone()}
    torch.save(original, tmp_path / "in.pt")

    loaded = ptfile.load(tmp_path / "in.pt")
    assert_structure_matches(loaded, torch.load(tmp_path / "in.pt"))
    assert loaded["weight"].itemsize == tensor.element_size()
    assert loaded["weight"].path == str(tmp_path / "in.pt")
    assert_same(resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True), original)


def test_float8_and_uint16_use_untyped_storage(tmp_path):
    original = {
        "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "u16": torch.tensor([1, 65535, 7], dtype=torch.uint16),
    }
    torch.save(original, tmp_path / "in.pt")
    loaded = ptfile.load(tmp_path / "in.pt")
    assert loaded["f8"].dtype == "float8_e4m3fn" and loaded["f8"].storage.dtype == "uint8"
    np.testing.assert_array_equal(loaded["f8"].read(), original["f8"].view(torch.uint8).numpy())
    np.testing.assert_array_equal(loaded["u16"].read(), [1, 65535, 7])
    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True)
    assert again["f8"].dtype == torch.float8_e4m3fn
    assert torch.equal(again["f8"].view(torch.uint8), original["f8"].view(torch.uint8))
    assert torch.equal(again["u16"].to(torch.int32), original["u16"].to(torch.int32))


def test_views_share_a_storage_when_read_and_get_their_own_when_written(tmp_path):
    base = torch.arange(100, dtype=torch.float32)
    original = {
        "all": base.view(10, 10),
        "row": base.view(10, 10)[3],
        "middle": base[17:40],
        "block": base.view(10, 10)[2:5],
    }
    torch.save(original, tmp_path / "in.pt")

    loaded = ptfile.load(tmp_path / "in.pt")
    assert_structure_matches(loaded, torch.load(tmp_path / "in.pt"))
    assert len({id(ref.storage) for ref in loaded.values()}) == 1
    row = loaded["row"]
    assert row.storage_offset == 30 and row.byte_offset == row.storage.byte_offset + 120
    np.testing.assert_array_equal(loaded["middle"].read(5, 3), [22, 23, 24])

    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True)
    assert_same(again, original)
    for name, tensor in again.items():
        assert tensor.storage_offset() == 0
        assert tensor.untyped_storage().nbytes() == original[name].numel() * 4


def test_non_contiguous_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.int64).view(4, 6)
    original = {"transposed": base.t(), "strided": base[:, ::2], "expanded": torch.arange(3).expand(4, 3)}
    torch.save(original, tmp_path / "in.pt")

    loaded = ptfile.load(tmp_path / "in.pt")
    assert_structure_matches(loaded, torch.load(tmp_path / "in.pt"))
    for ref in loaded.values():
        assert not ref.is_contiguous
        with pytest.raises(ValueError):
            ref.read()
    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True)
    assert_same(again, original)
    assert all(tensor.is_contiguous() for tensor in again.values())


def test_zero_dim_and_empty_tensors(tmp_path):
    original = {"step": torch.tensor(7.0), "empty": torch.zeros(0, 3, dtype=torch.bfloat16), "count": torch.tensor(3)}
    torch.save(original, tmp_path / "in.pt")
    loaded = ptfile.load(tmp_path / "in.pt")
    assert_structure_matches(loaded, torch.load(tmp_path / "in.pt"))
    assert loaded["step"].shape == () and loaded["step"].numel == 1
    assert loaded["step"].read_array().shape == () and loaded["step"].read_array() == 7.0
    assert loaded["empty"].read_array().shape == (0, 3)
    assert_same(resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True), original)


def test_parameters_keep_requires_grad(tmp_path):
    trained = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    original = {"trained": trained, "frozen": frozen, "grad_tensor": torch.ones(2).requires_grad_()}
    torch.save(original, tmp_path / "in.pt")

    loaded = ptfile.load(tmp_path / "in.pt")
    assert_structure_matches(loaded, torch.load(tmp_path / "in.pt"))
    assert loaded["trained"].is_parameter and loaded["trained"].requires_grad
    assert loaded["frozen"].is_parameter and not loaded["frozen"].requires_grad
    assert not loaded["grad_tensor"].is_parameter and loaded["grad_tensor"].requires_grad
    assert_same(resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True), original)


def test_python_attributes_on_tensors_and_parameters(tmp_path):
    tensor = torch.ones(2)
    tensor.partition_dim = 0
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.tensor_model_parallel = True
    torch.save({"tensor": tensor, "parameter": parameter}, tmp_path / "in.pt")

    loaded = ptfile.load(tmp_path / "in.pt")
    assert loaded["tensor"].python_state == {"partition_dim": 0}
    assert loaded["parameter"].python_state == {"tensor_model_parallel": True}
    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=False)
    assert again["tensor"].partition_dim == 0 and torch.equal(again["tensor"], tensor)
    assert again["parameter"].tensor_model_parallel is True and isinstance(again["parameter"], torch.nn.Parameter)


# ---------------------------------------------------------------------------------------------
# Containers and objects


def test_nested_containers_and_shared_objects(tmp_path):
    shared_list = [1, 2.5, "three"]
    weight = torch.arange(6, dtype=torch.float32).view(2, 3)
    state = collections.OrderedDict([("w", weight), ("w_again", weight)])
    state._metadata = {"": {"version": 1}}
    original = {
        "state": state,
        "scalars": (True, None, 3, -4.5, "text", b"bytes"),
        "first": shared_list,
        "second": shared_list,
        "shape": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "nested": {"list": [[], {}, ()], 7: {"deep": [weight]}},
    }
    torch.save(original, tmp_path / "in.pt")

    loaded = ptfile.load(tmp_path / "in.pt")
    assert_structure_matches(loaded, torch.load(tmp_path / "in.pt"))
    assert loaded["first"] is loaded["second"]
    assert loaded["state"]["w"] is loaded["state"]["w_again"] is loaded["nested"][7]["deep"][0]
    assert loaded["state"]._metadata == {"": {"version": 1}}
    assert loaded["device"].type == "cuda" and loaded["device"].index == 1

    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True)
    assert_same(again, original)
    assert again["first"] is again["second"]
    assert again["state"]["w"] is again["state"]["w_again"] is again["nested"][7]["deep"][0]
    assert again["state"]._metadata == {"": {"version": 1}}


def test_numpy_and_stdlib_objects_are_real(tmp_path):
    import argparse

    args = argparse.Namespace(hidden_size=64, params_dtype=torch.bfloat16)
    rng = np.random.RandomState(5).get_state()
    # torch's weights_only loader rejects these, and empty bytes (pickled as `__builtin__.bytes()`).
    torch.save(
        {
            "args": args,
            "np_rng": rng,
            "np_scalar": np.float64(2.5),
            "empty": b"",
            "counts": collections.defaultdict(list, {"a": [1]}),
        },
        tmp_path / "in.pt",
    )

    loaded = ptfile.load(tmp_path / "in.pt")
    assert isinstance(loaded["args"], argparse.Namespace)
    assert loaded["args"].hidden_size == 64 and loaded["args"].params_dtype == ptfile.DType("bfloat16")
    assert loaded["np_rng"][0] == "MT19937"
    np.testing.assert_array_equal(loaded["np_rng"][1], rng[1])
    assert loaded["np_scalar"] == np.float64(2.5)
    assert loaded["empty"] == b""

    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=False)
    assert again["args"].params_dtype is torch.bfloat16
    np.testing.assert_array_equal(again["np_rng"][1], rng[1])
    assert again["empty"] == b""
    assert again["counts"].default_factory is list and again["counts"]["a"] == [1]


def test_unknown_classes_become_opaque_and_are_rebuilt_by_torch(tmp_path):
    registry = helpers.Registry({"a": 1, "b": torch.ones(2)}, owner="me")
    original = {
        "fragment": helpers.Fragment(numel=10, start=4),
        "stage": helpers.Stage.optimizer_states,
        "scaler": helpers.Scaler(2.0**16, True),
        "registry": registry,
        "inner": helpers.Outer.Inner([1, 2]),
        "class": helpers.Scaler,
        "stages": [helpers.Stage.disabled, helpers.Stage.gradients],
    }
    torch.save(original, tmp_path / "in.pt")

    loaded = ptfile.load(tmp_path / "in.pt")
    fragment, stage, scaler = loaded["fragment"], loaded["stage"], loaded["scaler"]
    assert isinstance(fragment, ptfile.Opaque)
    assert (fragment.opaque_module, fragment.opaque_qualname) == ("ptfile_helpers", "Fragment")
    assert fragment.opaque_created_by == "NEWOBJ" and (fragment.numel, fragment.start) == (10, 4)
    assert repr(fragment) == "ptfile_helpers.Fragment(numel=10, start=4)"
    assert stage.opaque_created_by == "REDUCE" and int(stage) == 1 and int(loaded["stages"][1]) == 2
    assert repr(stage) == "ptfile_helpers.Stage(1)"
    assert scaler.cur_scale == 65536.0 and scaler.dynamic is True
    assert type(stage) is type(loaded["stages"][0])
    with pytest.raises(AttributeError):
        scaler.missing
    with pytest.raises(TypeError):
        int(scaler)
    assert loaded["registry"].opaque_entries["a"] == 1 and loaded["registry"].owner == "me"
    assert_ref_matches(loaded["registry"].opaque_entries["b"], registry["b"])
    assert loaded["inner"].opaque_qualname == "Outer.Inner" and loaded["inner"].value == [1, 2]
    assert loaded["class"].opaque_qualname == "Scaler"

    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=False)
    assert again["fragment"] == original["fragment"]
    assert again["stage"] is helpers.Stage.optimizer_states
    assert again["stages"] == original["stages"]
    assert again["scaler"] == original["scaler"]
    assert type(again["registry"]) is helpers.Registry and again["registry"].owner == "me"
    assert again["registry"]["a"] == 1 and torch.equal(again["registry"]["b"], registry["b"])
    assert type(again["inner"]) is helpers.Outer.Inner and again["inner"].value == [1, 2]
    assert again["class"] is helpers.Scaler


def test_keyword_constructed_objects_use_protocol_4(tmp_path):
    torch.save({"sized": helpers.Sized(size=3)}, tmp_path / "in.pt", pickle_protocol=4)
    loaded = ptfile.load(tmp_path / "in.pt")
    assert loaded["sized"].opaque_kwargs == {"size": 3}
    again = resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=False)
    assert type(again["sized"]) is helpers.Sized and again["sized"].size == 3


def test_array_tensors(tmp_path):
    weights = np.linspace(-3, 3, 12, dtype=np.float32)
    bf16_bits = ptfile.float32_to_bfloat16_bits(weights)
    obj = {
        "fp32": ptfile.ArrayTensor(weights, "float32", shape=(3, 4)),
        "bf16": ptfile.ArrayTensor(bf16_bits, "bfloat16"),
        "mask": ptfile.ArrayTensor(weights > 0, "bool"),
        "step": ptfile.ArrayTensor(np.float32(5.0), "float32"),
        "ids": ptfile.ArrayTensor(np.arange(4, dtype=np.int64)[::2], "int64"),
    }
    ptfile.save(obj, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(loaded["fp32"], torch.from_numpy(weights).view(3, 4))
    assert torch.equal(loaded["bf16"], torch.from_numpy(weights).to(torch.bfloat16))
    assert torch.equal(loaded["mask"], torch.from_numpy(weights) > 0)
    assert loaded["step"].shape == () and loaded["step"].item() == 5.0
    assert torch.equal(loaded["ids"], torch.tensor([0, 2]))
    with pytest.raises(ValueError):
        ptfile.ArrayTensor(weights.astype(np.float64), "float32")
    with pytest.raises(ValueError):
        ptfile.ArrayTensor(weights, "float32", shape=(5, 5))


def test_bfloat16_conversions_match_torch():
    special = np.array(
        [0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-40, 1.00390625, 1.01171875], dtype=np.float32
    )
    values = np.concatenate([special, np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bits = ptfile.float32_to_bfloat16_bits(values)
    np.testing.assert_array_equal(bits, expected)
    back = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ptfile.bfloat16_bits_to_float32(bits), back)
    assert ptfile.numpy_dtype("bfloat16") == np.uint16 and ptfile.numpy_dtype("bool") == np.bool_


def test_written_layout_matches_torch_offsets_and_mmap(tmp_path, monkeypatch):
    original = {f"t{i}": torch.arange(i * 7 + 1, dtype=torch.float16) for i in range(5)}
    original["big"] = torch.randn(1000, 33)
    torch.save(original, tmp_path / "in.pt")
    resave(tmp_path / "in.pt", tmp_path / "out.pt", weights_only=True)

    names = [info.filename for info in zipfile.ZipFile(tmp_path / "out.pt").infolist()]
    assert names[:4] == ["out/data.pkl", "out/.format_version", "out/.storage_alignment", "out/byteorder"]
    assert names[-2:] == ["out/version", "out/.data/serialization_id"]
    assert zipfile.ZipFile(tmp_path / "out.pt").testzip() is None  # every CRC-32 is right
    for ref in ptfile.load(tmp_path / "out.pt").values():
        assert ref.byte_offset % 64 == 0

    # torch computes storage offsets without reading zip headers when this is on, and checks
    # them against the headers in debug mode; both only work if the layout is exactly miniz's.
    from torch.utils.serialization import config

    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    with config.patch("load.calculate_storage_offsets", True):
        assert config.load.calculate_storage_offsets
        assert_same(torch.load(tmp_path / "out.pt", mmap=True, weights_only=True), original)


def test_save_is_atomic(tmp_path):
    target = tmp_path / "out.pt"
    ptfile.save({"v": 1}, target)
    with pytest.raises(Exception):
        ptfile.save({"v": 2, "bad": lambda: None}, target)
    tensor_source = tmp_path / "gone.pt"
    torch.save({"w": torch.ones(10)}, tensor_source)
    refs = ptfile.load(tensor_source)
    os.unlink(tensor_source)
    with pytest.raises(CheckpointError, match="gone.pt"):
        ptfile.save(refs, target)
    assert sorted(os.listdir(tmp_path)) == ["out.pt"]
    assert torch.load(target) == {"v": 1}


# ---------------------------------------------------------------------------------------------
# Large files: structure without data, exact reads, bounded memory


class BytesRead:
    """Counts the bytes this process reads with read-like system calls inside a with-block."""

    @staticmethod
    def rchar():
        with open("/proc/self/io", "rb", buffering=0) as io_stats:
            text = io_stats.read()
        return int(text.split(b"rchar:")[1].split()[0]), len(text)

    def __enter__(self):
        value, own_read = self.rchar()
        self.start = value + own_read
        return self

    def __exit__(self, *exc_info):
        self.count = self.rchar()[0] - self.start


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_large_file_structure_and_slices_read_only_what_is_asked(tmp_path):
    numel = 75_000_000  # 300 MB of int32
    big = torch.arange(numel, dtype=torch.int32)
    torch.save({"big": big, "small": torch.ones(3)}, tmp_path / "big.pt")
    del big

    with BytesRead() as structure_read:
        started = time.perf_counter()
        loaded = ptfile.load(tmp_path / "big.pt")
        elapsed = time.perf_counter() - started
    print(f"\nstructure load of a 300 MB file: {elapsed * 1000:.1f} ms, {structure_read.count} bytes read")
    assert elapsed < 0.5
    assert structure_read.count < 64 * 1024

    with BytesRead() as slice_read:
        chunk = loaded["big"].read(start=12_345_678, count=1000)
    assert slice_read.count == 4000
    np.testing.assert_array_equal(chunk, np.arange(12_345_678, 12_346_678, dtype=np.int32))

    started = time.perf_counter()
    everything = loaded["big"].read()
    elapsed = time.perf_counter() - started
    print(f"read of 300 MB: {300 / elapsed:.0f} MB/s")
    assert everything[-1] == numel - 1
    del everything

    tracemalloc.start()
    started = time.perf_counter()
    ptfile.save(loaded, tmp_path / "copy.pt")
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"save (copy) of 300 MB: {300 / elapsed:.0f} MB/s, peak Python memory {peak / 2**20:.1f} MiB")
    assert peak < 40 * 2**20
    copy = torch.load(tmp_path / "copy.pt", mmap=True, weights_only=True)
    assert copy["big"][12_345_678].item() == 12_345_678 and copy["big"][-1].item() == numel - 1
    del copy
    for name in ("big.pt", "copy.pt"):  # pytest keeps recent temporary directories; free the disk now
        os.unlink(tmp_path / name)


def test_saving_a_large_array_holds_no_second_copy(tmp_path):
    array = np.arange(50_000_000, dtype=np.int32)  # 200 MB
    tracemalloc.start()
    ptfile.save({"w": ptfile.ArrayTensor(array, "int32")}, tmp_path / "array.pt")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20
    loaded = torch.load(tmp_path / "array.pt", mmap=True, weights_only=True)
    assert loaded["w"].shape == (50_000_000,) and loaded["w"][-1].item() == 49_999_999
    del loaded
    os.unlink(tmp_path / "array.pt")


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def real_checkpoint(tmp_path):
    path = tmp_path / "real.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32), "meta": {"step": 3}}, path)
    return path


def assert_checkpoint_error(path, match):
    with pytest.raises(CheckpointError, match=match) as raised:
        ptfile.load(path)
    assert str(path) in str(raised.value)
    assert str(raised.value).count(". ") == 0  # one sentence


def test_error_missing_file(tmp_path):
    assert_checkpoint_error(tmp_path / "nothing.pt", "does not exist")


def test_error_not_a_zip(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("just some text, not a checkpoint\n")
    assert_checkpoint_error(path, "not a PyTorch checkpoint")


@pytest.mark.parametrize("keep_fraction", [0.3, 0.9, 0.99])
def test_error_truncated(tmp_path, real_checkpoint, keep_fraction):
    data = real_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    assert_checkpoint_error(path, "truncated")


def test_error_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("other/readme.txt", "hello")
    assert_checkpoint_error(path, "no data.pkl")


def test_error_storage_record_too_short(tmp_path, real_checkpoint):
    # Rebuild the archive with Python's zipfile (no alignment padding) and a short data/0.
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(real_checkpoint) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info.filename, data[:100] if info.filename.endswith("data/0") else data)
    assert_checkpoint_error(path, "shorter than the 4000 bytes")


def test_plain_zipfile_archive_is_read_correctly(tmp_path, real_checkpoint):
    path = tmp_path / "repacked.pt"
    with zipfile.ZipFile(real_checkpoint) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    np.testing.assert_array_equal(ptfile.load(path)["w"].read(), np.arange(1000, dtype=np.float32))


def test_error_legacy_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert_checkpoint_error(path, "legacy")


def test_error_unsupported_tensor_kind(tmp_path):
    path = tmp_path / "sparse.pt"
    torch.save({"s": torch.eye(3).to_sparse()}, path)
    assert_checkpoint_error(path, "cannot read")


# ---------------------------------------------------------------------------------------------
# Real DeepSpeed checkpoints

DEEPSPEED_TRAINING = textwrap.dedent("""
    import sys
    import deepspeed
    import torch

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for _ in range(2):
        loss = engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(sys.argv[-1], tag="step2")
    """)


@pytest.fixture(scope="session")
def deepspeed_checkpoint(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deepspeed")
    script = workdir / "train.py"
    script.write_text(DEEPSPEED_TRAINING)
    run_deepspeed(script, [str(workdir / "ckpt")], num_procs=2, log_path=workdir / "train.log", timeout=600,
                  what="saving the ptfile test checkpoint")
    return workdir / "ckpt" / "step2"


@pytest.mark.parametrize("name", ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_deepspeed_files_match_torch_load(deepspeed_checkpoint, name):
    path = deepspeed_checkpoint / name
    assert_structure_matches(ptfile.load(path), torch.load(path, weights_only=False))


def test_deepspeed_optimizer_state_round_trip(deepspeed_checkpoint, tmp_path):
    path = deepspeed_checkpoint / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = ptfile.load(path)["optimizer_state_dict"]
    assert int(state["zero_stage"]) == 1
    assert state["loss_scaler"].cur_scale == 1.0 and state["loss_scaler"].dynamic is False
    fragments = state["param_slice_mappings"][0]
    assert all(isinstance(fragment.numel, int) and isinstance(fragment.start, int) for fragment in fragments.values())
    adam = state["base_optimizer_state"]["state"][0]
    assert adam["step"].shape == () and adam["step"].dtype == "float32"

    original = torch.load(path, weights_only=False)
    again = resave(path, tmp_path / "optim.pt", weights_only=False)
    assert_same(again, original)
    scaler = again["optimizer_state_dict"]["loss_scaler"]
    assert type(scaler) is type(original["optimizer_state_dict"]["loss_scaler"])
    assert vars(scaler) == vars(original["optimizer_state_dict"]["loss_scaler"])
    assert again["optimizer_state_dict"]["zero_stage"] is original["optimizer_state_dict"]["zero_stage"]
    assert (
        again["optimizer_state_dict"]["param_slice_mappings"]
        == original["optimizer_state_dict"]["param_slice_mappings"]
    )


def test_deepspeed_model_state_round_trip(deepspeed_checkpoint, tmp_path):
    path = deepspeed_checkpoint / "mp_rank_00_model_states.pt"
    original = torch.load(path, weights_only=True)
    assert_same(resave(path, tmp_path / "model.pt", weights_only=True), original)


def test_load_and_save_never_import_torch_or_deepspeed(deepspeed_checkpoint, tmp_path):
    script = textwrap.dedent("""
        import sys
        from ucpflow import ptfile
        from ucpflow.ptfile import allowlist  # noqa: F401 (its import must not bring torch in either)

        for path in sys.argv[1:3]:
            checkpoint = ptfile.load(path)
            ptfile.save(checkpoint, path + ".copy")
        state = ptfile.load(sys.argv[1])["optimizer_state_dict"]
        print(int(state["zero_stage"]), state["loss_scaler"].cur_scale)
        print(state["single_partition_of_fp32_groups"][0].read(0, 4))
        imported = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "deepspeed"))
        assert not imported, imported
        """)
    paths = []
    for name in ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"):
        shutil.copy(deepspeed_checkpoint / name, tmp_path / name)
        paths.append(str(tmp_path / name))
    environment = dict(os.environ, PYTHONPATH=SRC_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "1 1.0"
    assert_same(torch.load(paths[1] + ".copy", weights_only=True), torch.load(paths[1], weights_only=True))
