"""OpenCLIP text encoders (SD 2.x's ViT-H, SDXL's bigG) stream like every other module: the fused q/k/v tensors
are split as views, so each source tensor is read once and no module is read whole (bigG's in_proj tensors alone
are 0.59 GiB in float32; reading TE2 whole put a 6.9 GB SDXL load 0.5 GiB over its float32 size)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import save_file

from library.models import ldm_convert as lc
from library.models import sdxl
from library.models.checkpoint_io import open_checkpoint
from library.models.loading import Prefixed, load_components, stream
from library.models.saving import to_ldm_state_dict


def _diffusers(openclip: dict, prefix: str) -> dict:
    """diffusers' own converter (copies), the reference for names and values."""
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=openclip["token_embedding.weight"].shape[1]))
    out = convert_open_clip_checkpoint(stub, lc.add_prefix(openclip, prefix), prefix=prefix)
    return {k: v for k, v in out.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl"])
def test_views_equal_diffusers_converter(name, tiny_parts):
    ldm = to_ldm_state_dict(tiny_parts[name])
    if name == "tiny-sdxl":
        openclip = {k: v for k, v in lc.strip_prefix(ldm, sdxl.TE2_PREFIX).items() if k != "logit_scale"}
        ours, prefix = sdxl._openclip_to_transformers(openclip), sdxl.TE2_PREFIX
    else:
        openclip, _ = lc.split_openclip(lc.strip_prefix(ldm, lc.OPENCLIP_PREFIX))
        ours = {"text_model." + k: v for k, v in lc.openclip_to_transformers(openclip).items()}
        prefix = lc.OPENCLIP_PREFIX
    reference = _diffusers(openclip, prefix)
    assert ours.keys() == reference.keys()
    for key, value in ours.items():
        assert torch.equal(value, reference[key]), key
        # Every output is a source tensor or a view of one: nothing is computed.
        assert value._base is not None or any(value is v for v in openclip.values()), key


class CountingFile:
    """A TensorFile that counts how often each tensor is read."""

    def __init__(self, file):
        self.file, self.reads = file, {}

    def load(self, key, dtype=None):
        self.reads[key] = self.reads.get(key, 0) + 1
        return self.file.load(key, dtype)


def test_te2_reads_each_tensor_once_and_keeps_no_fused_storage(tiny_parts, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file(to_ldm_state_dict(tiny_parts["tiny-sdxl"], torch.float16), str(path))
    with open_checkpoint(path) as file:
        te2 = {k: v for k, v in lc.strip_prefix(file.meta, sdxl.TE2_PREFIX).items() if k != "logit_scale"}
        counting = CountingFile(file)
        pairs = stream(counting, Prefixed(te2, sdxl.TE2_PREFIX), sdxl._openclip_to_transformers, torch.float32)
        first = next(pairs)
        assert sum(counting.reads.values()) == 1  # lazy: one source read for the first output, not the module
        out = dict([first, *pairs])
    assert counting.reads == {sdxl.TE2_PREFIX + k: 1 for k in te2}
    q = out["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    width = q.shape[1]
    assert q.shape == (width, width)
    # The split parts are their own copies: the fused (3 x width) tensor they came from is not kept alive.
    assert q.untyped_storage().nbytes() == q.numel() * 4
    assert out["text_projection.weight"].shape == (width, width)
    # And the encoder built from the stream equals the one the model was saved from.
    loaded = load_components(str(path)).text_encoders[1]
    saved = tiny_parts["tiny-sdxl"].text_encoders[1].state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key].half().float()), key
