"""The built-in tiny models take real settings: SD's 8x VAE downsampling, so a 512 px config caches in seconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.data.dataset import latent_requests
from library.data.plan import plan_run
from library.models.ldm_configs import infer_vae_config
from library.models.ldm_convert import VAE_PREFIX, strip_prefix
from library.models.saving import to_ldm_state_dict
from library.training.latents import build_latent_cache
from tests.helpers import make_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_tiny_vae_has_sds_four_levels_in_every_layout(tiny_parts, name):
    vae = tiny_parts[name].vae.config
    assert len(vae.block_out_channels) == 4  # three 2x downsamples: SD's latent stride of 8
    assert list(vae.down_block_types) == ["DownEncoderBlock2D"] * 4
    # Loading a single file infers the VAE from tensor shapes: the 4-level tiny VAE must come back unchanged.
    ldm_vae = strip_prefix(to_ldm_state_dict(tiny_parts[name]), VAE_PREFIX)
    inferred = infer_vae_config(ldm_vae, source=name, scaling_factor=tiny_parts[name].family.latent_scale)
    assert inferred["block_out_channels"] == list(vae.block_out_channels)
    assert inferred["layers_per_block"] == vae.layers_per_block


def test_tiny_sd1_caches_a_512px_image_as_64x64_latents(tmp_path, tiny_parts):
    parts = tiny_parts["tiny-sd1"]
    # Checked first so that a 2x VAE fails here at once instead of spending minutes in one 256x256 attention op.
    assert 2 ** (len(parts.vae.config.block_out_channels) - 1) == 8
    make_image_folder(tmp_path / "train", repeats=1, count=1, sizes=((512, 512),))
    config = resolve(["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "train"),
                      "--caption_extension", ".txt", "--resolution", "512", "--cache_latents", "--seed", "0",
                      "--output_dir", str(tmp_path / "out")], NETWORK, OPTIONS)
    plan = plan_run(config)
    accelerator = SimpleNamespace(device=torch.device("cpu"), print=lambda *args: None)
    cache = build_latent_cache(config, plan, parts, accelerator)
    (request,) = latent_requests(plan)
    assert request.bucket_reso == (512, 512)
    assert tuple(cache.get(request).latents.shape) == (4, 64, 64)
