""".pt/.ckpt files pass AUTOMATIC1111's safe-unpickle check (modules/safe.py, on by default) and load everywhere.

`a1111_check` restates A1111's rule: every zip entry must match its name pattern, and the pickle may name only the
globals its RestrictedUnpickler allows (tensors are rebuilt on empty storages, as there: only the globals matter).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile

import pytest
import torch

from library.formats.a1111_pickle import ALIGNMENT, write_pickle
from library.formats.embedding_files import load_embedding, save_a1111, save_kohya
from library.models.saving import save_single_file, to_ldm_state_dict
from networks.hypernetwork import Hypernetwork, load_hypernetwork, save_hypernetwork

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The zip-entry patterns: v1.10.x, and older releases (no byteorder / serialization id), which files must pass too.
ZIP_NAMES = {
    "v1.10": re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$"),
    "older": re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$"),
}
DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
# (module, name) pairs A1111's RestrictedUnpickler.find_class returns; everything else raises.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", name) for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                   "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}


class A1111Refused(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise A1111Refused(f"persistent id {saved_id[0]!r}")
        return torch.storage.TypedStorage(_internal=True)  # empty, as in A1111: the data is never read

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise A1111Refused(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)


def a1111_check(path, rule: str = "v1.10") -> None:
    """Raise A1111Refused where A1111 would print "the file may be malicious"; return where it would load."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise A1111Refused("not a zip (legacy pickle)") from None
    with archive:
        names = archive.namelist()
        bad = [name for name in names if not ZIP_NAMES[rule].match(name)]
        if bad:
            raise A1111Refused(f"bad file inside {path}: {bad[0]}")
        pickles = [name for name in names if DATA_PKL.match(name)]
        if not pickles:
            raise A1111Refused("data.pkl not found")
        with archive.open(pickles[0]) as file:
            _RestrictedUnpickler(file).load()


def _entries_and_alignment(path) -> tuple[list[str], list[int]]:
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    offsets = []
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        offsets.append((info.header_offset + 30 + name_len + extra_len) % ALIGNMENT)
    return [info.filename.split("/", 1)[1] for info in infos], offsets


def _assert_loads_everywhere(path, check) -> None:
    """torch.load as sd-scripts (default), ComfyUI (weights_only=True) and our loaders (mmap) call it."""
    for kwargs in ({}, {"weights_only": True}, {"weights_only": False}, {"weights_only": True, "mmap": True}):
        check(torch.load(path, map_location="cpu", **kwargs))


# ---- the check itself is real -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ZIP_NAMES)
def test_a_plain_torch_save_file_is_refused(tmp_path, rule):
    path = tmp_path / "plain.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 8)}, "name": "x"}, path)
    with pytest.raises(A1111Refused, match=r"bad file inside .*/\.format_version"):
        a1111_check(path, rule)


def test_a_forbidden_global_is_refused_even_with_allowed_entry_names(tmp_path):
    # torch.save's zip with only the allowed entries kept, holding a pickled module: the names pass, the pickle not.
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    path = tmp_path / "stripped.pt"
    with zipfile.ZipFile(tmp_path / "module.pt") as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            if ZIP_NAMES["older"].match(name):
                dst.writestr(name, src.read(name))
    with pytest.raises(A1111Refused, match="torch.nn.modules.linear/Linear"):
        a1111_check(path)


# ---- our files pass ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ZIP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a1111_embedding_passes_and_loads_everywhere(tmp_path, rule, dtype):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    path = save_a1111(tmp_path / "mything.pt", vectors, name="mything", step=12, sd_checkpoint="0123456789",
                      dtype=dtype)
    a1111_check(path, rule)

    def check(data):
        assert data["name"] == "mything" and data["step"] == 12 and data["string_to_token"] == {"*": 265}
        assert torch.equal(data["string_to_param"]["*"], vectors.to(dtype))

    _assert_loads_everywhere(path, check)
    assert torch.equal(load_embedding(path).vectors, vectors.to(dtype).float())


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_kohya_pickle_embedding_passes(tmp_path, suffix):
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    path = save_kohya(tmp_path / f"emb{suffix}", vectors)
    for rule in ZIP_NAMES:
        a1111_check(path, rule)
    _assert_loads_everywhere(path, lambda data: torch.equal(data["emb_params"], vectors) or pytest.fail("values"))


def test_hypernetwork_passes_and_round_trips(tmp_path):
    network = Hypernetwork((32, 64), layer_structure=(1, 2, 1), activation_func="relu", add_layer_norm=True,
                           dropout_structure=(0, 0.1, 0))
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(generator=torch.Generator().manual_seed(2))
    path = save_hypernetwork(tmp_path / "hn.pt", network, step=5, name="hn", optional_info="note")
    for rule in ZIP_NAMES:
        a1111_check(path, rule)

    def check(data):
        assert data["name"] == "hn" and data["layer_structure"] == [1, 2, 1] and data["dropout_structure"] == [0, 0.1, 0]
        assert torch.equal(data[64][1]["linear.0.weight"], network.pair(64)[1].linear[0].weight)

    _assert_loads_everywhere(path, check)
    loaded, info = load_hypernetwork(path)
    assert info["step"] == 5
    for (key, a), b in zip(network.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_ckpt_passes_and_holds_the_model(tiny_parts, tmp_path, name):
    path = save_single_file(tiny_parts[name], tmp_path / "model.ckpt", epoch=3, global_step=40)
    for rule in ZIP_NAMES:
        a1111_check(path, rule)
    expected = to_ldm_state_dict(tiny_parts[name])

    def check(data):
        assert (data["epoch"], data["global_step"]) == (3, 40)
        assert data["state_dict"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(data["state_dict"][key], value), key

    _assert_loads_everywhere(path, check)


def test_files_hold_only_allowed_entries_with_64_byte_aligned_data(tmp_path):
    path = tmp_path / "t.pt"
    # Odd sizes, so an unpadded entry would land off the boundary.
    write_pickle({"a": torch.ones(3), "b": torch.ones(5, dtype=torch.float16), "c": [torch.ones(7)]}, path)
    names, misalignment = _entries_and_alignment(path)
    assert names == ["data.pkl", "data/0", "data/1", "data/2", "version"]
    assert misalignment == [0] * len(names)
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert loaded["a"].data_ptr() % ALIGNMENT == 0 and loaded["c"][0].data_ptr() % ALIGNMENT == 0


def test_views_are_stored_compactly_and_odd_tensors_round_trip(tmp_path):
    big = torch.arange(1000 * 8, dtype=torch.float32).reshape(1000, 8)
    data = {"view": big[-2:], "transposed": big[:3].t(), "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
            "empty": torch.zeros(0, 4), "long": torch.arange(4), "ordered": collections.OrderedDict(x=torch.ones(1)),
            "plain": [1, 2.5, "s", None, True, (3,)]}
    path = tmp_path / "odd.pt"
    write_pickle(data, path)
    assert path.stat().st_size < 4096
    loaded = torch.load(path, weights_only=True)
    for key in ("view", "transposed", "scalar", "empty", "long"):
        assert loaded[key].dtype == data[key].dtype and torch.equal(loaded[key], data[key]), key
    assert loaded["plain"] == data["plain"] and torch.equal(loaded["ordered"]["x"], torch.ones(1))
    a1111_check(path, "older")


@pytest.mark.parametrize("value", [object(), torch.nn.Linear(2, 2), torch.zeros(2, dtype=torch.bool)])
def test_writer_refuses_what_a1111_could_not_load(tmp_path, value):
    with pytest.raises(TypeError, match="A1111-safe pickle"):
        write_pickle({"x": value}, io.BytesIO())


# ---- the other .pt/.ckpt writers: LoRA --save_model_as pt, tools/merge_models.py ----------------------------------

def test_lora_pt_passes(tmp_path):
    from networks.files import save_network_file

    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_x.alpha": torch.tensor(2.0)}
    path = save_network_file(tensors, tmp_path / "net.pt")
    for rule in ZIP_NAMES:
        a1111_check(path, rule)


def test_merged_ckpt_passes(tmp_path):
    from tools.merge_models import write_model

    path = write_model({"model.diffusion_model.out.2.bias": torch.ones(4)}, tmp_path / "merged.ckpt")
    for rule in ZIP_NAMES:
        a1111_check(path, rule)
