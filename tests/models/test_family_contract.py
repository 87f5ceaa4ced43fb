"""The checks every registered model family passes, through its built-in tiny models.

Parametrised over `families()`: a new family module gets all of them by registering itself (and its tiny model).
Each check goes through the seam the rest of the code uses (`parts.family`, `load_components`, `save_model`,
the trainers), so a family that passes here works in every script.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from library.models.checkpoint_io import open_checkpoint
from library.models.family import (
    ImageConditioning,
    ModelFamily,
    TextConditioning,
    families,
    family_named,
    family_of_file,
    family_of_folder,
    family_of_tiny,
    tiny_model_names,
)
from library.models.loading import load_components
from library.models.saving import save_model, to_ldm_state_dict
from tests.helpers import assert_same_tensors, tiny_lora_flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [pytest.param(family, name, id=name) for family in families() for name in family.tiny_models]


def test_every_family_has_a_tiny_model_and_a_unique_name():
    names = [family.name for family in families()]
    assert len(names) == len(set(names)) and all(family_named(n).name == n for n in names)
    tiny = tiny_model_names()
    assert len(tiny) == len(set(tiny)) and len(TINY) == len(tiny)
    assert all(family.tiny_models for family in families()), "each family needs a tiny model for these checks"
    assert all(family_of_tiny(name).name in names for name in tiny)


@pytest.mark.parametrize("family, name", TINY)
def test_tiny_model_belongs_to_its_family_and_is_seeded(family: ModelFamily, name, tiny_parts):
    parts = tiny_parts[name]
    assert parts.family is family and parts.source == name
    assert len(parts.text_encoders) == len(parts.tokenizers) == len(family.text_encoder_targets)
    again = family.build_tiny(name, seed=0)
    assert_same_tensors(parts.unet.state_dict(), again.unet.state_dict())
    other = family.build_tiny(name, seed=1)
    assert not torch.equal(next(parts.unet.parameters()), next(other.unet.parameters()))


@pytest.mark.parametrize("family, name", TINY)
@pytest.mark.parametrize("form", ["model.safetensors", "model.ckpt", "diffusers"])
def test_load_save_reload_is_exact_and_detected_as_the_same_family(family, name, form, tiny_parts, tmp_path):
    parts = tiny_parts[name]
    dst = save_model(parts, tmp_path / form)
    if dst.is_file():
        with open_checkpoint(dst) as file:
            assert [f for f in families() if f.recognises(file.meta)] == [family]
    else:
        assert family_of_folder(json.loads((dst / "model_index.json").read_text())) is not None
    loaded = load_components(str(dst))
    assert loaded.family is family
    for ours, theirs in zip(parts.modules(), loaded.modules()):
        assert_same_tensors(ours.state_dict(), theirs.state_dict())
    assert_same_tensors(to_ldm_state_dict(parts), to_ldm_state_dict(loaded))
    assert [len(t) for t in loaded.tokenizers] == [len(t) for t in parts.tokenizers]


@pytest.mark.parametrize("family, name", TINY)
def test_single_file_keys_are_recognised_by_exactly_one_family(family, name, tiny_parts):
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in to_ldm_state_dict(tiny_parts[name]).items()}
    assert family_of_file(shapes) is family
    assert sum(f.recognises(shapes) for f in families()) == 1


@pytest.mark.parametrize("family, name", TINY)
@pytest.mark.parametrize("max_token_length", [None, 150])
def test_prompt_encoding_shapes(family, name, max_token_length, tiny_parts):
    parts = tiny_parts[name]
    encoder = family.prompt_encoder(parts, clip_skip=None, max_token_length=max_token_length)
    with torch.no_grad():
        text = encoder.conditioning(["a photo of sks dog", ""])
        hidden = encoder(["a photo of sks dog", ""])
    assert isinstance(text, TextConditioning) and torch.equal(text.hidden, hidden)
    tokens = 77 if max_token_length is None else max_token_length + 2
    assert text.hidden.shape == (2, tokens, parts.unet.config.cross_attention_dim)
    if text.pooled is not None:
        assert text.pooled.shape[0] == 2
    # Rows cached one caption at a time stack back into the batch exactly.
    assert torch.equal(TextConditioning.stack(text.rows()).hidden, text.hidden)
    assert encoder.encoder_identity() == family.prompt_encoder(
        parts, clip_skip=None, max_token_length=max_token_length).encoder_identity()


@pytest.mark.parametrize("family, name", TINY)
def test_prediction_has_the_latents_shape_and_trains(family, name, tiny_parts):
    parts = family.build_tiny(name, seed=0)  # trained here: not the shared fixture
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, parts.unet.config.in_channels, 4, 4, generator=generator) * family.latent_scale
    text = family.prompt_encoder(parts, clip_skip=None, max_token_length=None).conditioning(["a", "b"])
    images = [ImageConditioning((32, 32), (0, 0), (32, 32))] * 2
    parts.unet.requires_grad_(True)
    pred = family.predict(parts.unet, latents, torch.tensor([10, 500]), text, images)
    assert pred.shape == latents.shape
    torch.nn.functional.mse_loss(pred, torch.zeros_like(pred)).backward()
    grads = [p.grad for p in parts.unet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family, name", TINY)
def test_a_lora_training_run_names_and_labels_the_file_for_the_family(family, name, image_folder, tmp_path):
    import importlib

    script = importlib.import_module(family.network_script.removesuffix(".py"))  # train_network, sdxl_train_network

    flags = tiny_lora_flags(image_folder(count=2).parent, tmp_path / "out", "--network_args", "conv_dim=2",
                            steps=2, seed=1)
    flags[flags.index("tiny-sd1")] = name
    result = script.main(flags)
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with safe_open(str(result.final_file), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    prefixes = [family.unet_targets.prefix] + [t.prefix for t in family.text_encoder_targets]
    assert all(any(k.startswith(p + "_") for p in prefixes) for k in keys)
    assert all(any(k.startswith(p + "_") for k in keys) for p in prefixes), "every part gets adapters"
    assert {k: metadata[k] for k in family.ss_keys(False)} == {k: str(v) for k, v in family.ss_keys(False).items()}
    assert metadata["modelspec.architecture"] == family.modelspec_architecture(False, "lora")


@pytest.mark.parametrize("family, name", TINY)
def test_sampling_makes_an_image_of_the_asked_size(family, name, tiny_parts, tmp_path):
    from library.training.sampling import SamplePrompt, sample_images

    parts = tiny_parts[name]
    prompt = SamplePrompt("a photo", width=96, height=64, steps=2, scale=1.0, seed=3)
    (path,) = sample_images(parts, [prompt], output_dir=tmp_path, output_name="s", step=1, epoch=None,
                            default_sampler="ddim", device="cpu")
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (96, 64)
    assert family.pipeline(parts).unet is parts.unet


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_metadata_strings(family):
    keys = family.ss_keys(False)
    assert set(keys) == {"ss_v2", "ss_base_model_version"}
    assert family.base_model_version(False) == keys["ss_base_model_version"]
    assert family.modelspec_architecture(False, "lora").endswith("/lora")
    assert family.default_resolution(False) % 64 == 0 and family.embedding_keys()
    assert 0 < family.latent_scale < 1



def test_a_registered_family_is_found_by_the_loader_and_the_checks(monkeypatch):
    """Adding a family is one module plus one registration: here a test-time family with its own tiny model."""
    import dataclasses

    from library.models import family as registry
    from library.models.detect import check_base_model
    from library.models.sd1 import SD1, StableDiffusion

    class Fake(StableDiffusion):
        @property
        def tiny_models(self):
            return ("tiny-fake",)

        def build_tiny(self, name, *, seed=0, tokenizer=None):
            return dataclasses.replace(SD1.build_tiny("tiny-sd1", seed=seed, tokenizer=tokenizer), family=self,
                                       source=name)

    fake = Fake("fake", "Fake 1.x", "Fake Diffusion", 0.5, SD1.unet_targets, SD1.text_encoder_targets)
    families()  # the real families first, then the new one
    monkeypatch.setitem(registry._FAMILIES, "fake", fake)
    assert "tiny-fake" in tiny_model_names() and family_of_tiny("tiny-fake") is fake
    check_base_model("tiny-fake")  # no "no such file" error
    parts = load_components("tiny-fake")
    assert parts.family is fake and "family: Fake 1.x" in parts.describe()


def test_detection_order_and_the_default_family_do_not_depend_on_which_module_was_imported_first(monkeypatch):
    """A process that imported library.models.sdxl first (a test, a tool) registered SDXL before SD 1.x: the default
    family of a run without a model (a dry run's cache size) became SDXL's."""
    from library.models import family as registry
    from library.models.family import FAMILY_MODULES, family_from_flags

    real = families()
    assert [type(f).__module__ for f in real] == sorted((type(f).__module__ for f in real), key=FAMILY_MODULES.index)
    last = [f for f in real if type(f).__module__ == FAMILY_MODULES[-1]]
    # registered as if the last family module had been imported first
    monkeypatch.setattr(registry, "_FAMILIES", {f.name: f for f in last + [f for f in real if f not in last]})
    assert families() == real
    assert family_from_flags(object()) is family_named("sd1")


def test_only_family_modules_read_a_version_flag_or_the_latent_constant():
    """The seam's rule (#16): `grep -rn '\\.v2\\b\\|LATENT_SCALE\\|0\\.18215' library networks tools` finds family
    modules only; everything else asks `parts.family`."""
    import re
    from pathlib import Path

    from library.models.family import FAMILY_MODULES

    root = Path(__file__).resolve().parents[2]
    allowed = {root / (module.replace(".", "/") + ".py") for module in FAMILY_MODULES}
    pattern = re.compile(r"\.v2\b|LATENT_SCALE|0\.18215")
    found = [f"{path.relative_to(root)}:{n}" for folder in ("library", "networks", "tools")
             for path in sorted((root / folder).rglob("*.py")) if path not in allowed
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []
    assert allowed and all(path.is_file() for path in allowed)
