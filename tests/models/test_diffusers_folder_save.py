"""Diffusers folders we write: the text encoder uses the `text_model.` key spelling ComfyUI and transformers 4 read
(transformers 5, diffusers and our own loader still load it exactly), and saving leaves the model in memory untouched."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextModel

from library.models import ldm_convert as lc
from library.models.loading import load_components
from library.models.saving import save_diffusers, save_model
from tests.helpers import assert_same_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _keys(folder):
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), framework="pt") as f:
        return set(f.keys()), f.metadata()


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_text_encoder_keys_are_spelled_with_text_model(name, tiny_parts, tmp_path):
    parts = tiny_parts[name]
    save_diffusers(parts, tmp_path / "out")
    keys, metadata = _keys(tmp_path / "out")
    # The transformers-4 spelling: exactly the module's keys, each under `text_model.` (what ComfyUI looks up).
    assert keys == {"text_model." + k for k in parts.text_encoder.state_dict()}
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys
    assert metadata == {"format": "pt"}

    te, info = CLIPTextModel.from_pretrained(tmp_path / "out", subfolder="text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, parts.text_encoder.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(te.eval()(ids).last_hidden_state, parts.text_encoder(ids).last_hidden_state)

    loaded = load_components(str(tmp_path / "out"))
    assert_same_tensors(loaded.text_encoder.state_dict(), parts.text_encoder.state_dict())
    assert loaded.family is parts.family


def test_fp16_and_tool_saves_are_spelled_so_too_and_older_folders_still_load(tiny_parts, tmp_path):
    from safetensors.torch import load_file, save_file

    # tools/convert_model.py and merge_lora.py reach folders through save_model.
    save_model(tiny_parts["tiny-sd1"], tmp_path / "converted", precision="fp16")
    keys, _ = _keys(tmp_path / "converted")
    assert keys and all(k.startswith("text_model.") for k in keys)
    path = tmp_path / "converted" / "text_encoder" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("text_model.final_layer_norm.weight").dtype == torch.float16
    assert not list(path.parent.glob("*.respelled"))
    # Folders written before (bare transformers-5 `encoder.…` keys) keep loading.
    bare = {k.removeprefix("text_model."): v for k, v in load_file(str(path)).items()}
    save_file(bare, str(path), metadata={"format": "pt"})
    expected = {k: v.half() for k, v in tiny_parts["tiny-sd1"].text_encoder.state_dict().items()}
    assert_same_tensors(load_components(str(tmp_path / "converted"), dtype=torch.float16).text_encoder.state_dict(),
                        expected)


def test_clip_to_transformers4_is_idempotent_and_sharded_saves_are_respelled(tmp_path):
    import json

    from safetensors.torch import save_file

    from library.models.saving import respell_text_encoder

    sd = {"encoder.layers.0.mlp.fc1.weight": 1, "text_model.embeddings.token_embedding.weight": 2}
    assert lc.clip_to_transformers4(sd) == {"text_model.encoder.layers.0.mlp.fc1.weight": 1,
                                            "text_model.embeddings.token_embedding.weight": 2}
    # A text encoder big enough for transformers to shard it: the index and every shard get the new names.
    shards = {"model-00001-of-00002.safetensors": {"embeddings.token_embedding.weight": torch.ones(2)},
              "model-00002-of-00002.safetensors": {"final_layer_norm.weight": torch.zeros(2)}}
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name), metadata={"format": "pt"})
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    respell_text_encoder(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"text_model." + key: name for key, name in weight_map.items()}
    for name, tensors in shards.items():
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert set(f.keys()) == {"text_model." + key for key in tensors} and f.metadata() == {"format": "pt"}


def test_saving_in_another_precision_leaves_the_model_in_memory_untouched(tmp_path):
    from library.models.tiny import build_tiny

    # A model being trained (own copy: the shared fixture must not be touched) saved mid-run as fp16.
    parts = build_tiny("tiny-sd1", seed=3)
    with torch.no_grad():
        for p in parts.unet.parameters():
            p.add_(1e-4)  # values fp16 cannot hold exactly
    before = {name: {k: v.clone() for k, v in getattr(parts, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    params = [id(p) for p in parts.unet.parameters()]
    save_diffusers(parts, tmp_path / "fp16", precision="fp16")
    for name, tensors in before.items():
        assert_same_tensors(getattr(parts, name).state_dict(), tensors)
    assert [id(p) for p in parts.unet.parameters()] == params  # the optimizer's parameters are the same objects
    saved = load_components(str(tmp_path / "fp16"), dtype=torch.float16)
    assert_same_tensors(saved.unet.state_dict(), {k: v.half() for k, v in before["unet"].items()})


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sdxl"])
def test_a_folder_reports_the_precision_it_is_stored_in(name, tiny_parts, tmp_path):
    """diffusers loads a folder's weights as float32; the precision it stores (what saves keep) comes from the UNet's
    file, so an fp16 folder converts to an fp16 file without --save_precision."""
    from library.models.loading import load_components
    from library.models.saving import save_model

    folder = save_model(tiny_parts[name], tmp_path / "half", precision="fp16")
    parts = load_components(str(folder))
    assert parts.unet.dtype == torch.float32 and parts.source_dtype == torch.float16
    assert "stored as fp16" in parts.describe()
    single = save_model(parts, tmp_path / "half.safetensors", precision=None)  # convert_model without --save_precision
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(single)).values() if v.is_floating_point()} == {torch.float16}
