"""--masked_loss: mask images from conditioning_data_dir (red channel = weight) follow their image through resize,
bucketing, crop and flip, travel with cached latents, and weight the loss as sd-scripts' apply_masked_loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import train_network
from library.config.declarations import OPTIONS
from library.config.options import NETWORK
from library.config.resolve import resolve
from library.data.dataset import TrainingDataset, latent_requests
from library.data.latent_cache import LatentCache
from library.data.plan import plan_run
from library.errors import UserError
from library.training.losses import LossSettings, training_loss
from library.training.noise import make_noise_scheduler
from tests.helpers import make_image_folder

BUCKETS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "16"]


def _masks_like_red(images: "Path", masks: "Path") -> None:  # noqa: F821
    """Each image's mask is its own red channel (green/blue scrambled), so a processed mask must equal the processed
    image's red channel wherever the pipeline moves pixels."""
    masks.mkdir(parents=True, exist_ok=True)
    for image in sorted(images.glob("*.png")):
        red = np.asarray(Image.open(image).convert("RGB"))[..., 0]
        noise = np.random.default_rng(len(image.name)).integers(0, 256, red.shape, dtype=np.uint8)
        Image.fromarray(np.stack([red, noise, 255 - noise], axis=-1)).save(masks / image.name)


def _halves(images: "Path", masks: "Path", *, left: int = 0, right: int = 255) -> None:  # noqa: F821
    masks.mkdir(parents=True, exist_ok=True)
    for image in sorted(images.glob("*.png")):
        w, h = Image.open(image).size
        mask = np.full((h, w, 3), right, dtype=np.uint8)
        mask[:, : w // 2] = left
        Image.fromarray(mask).save(masks / image.with_suffix(".jpg").name, quality=100)


def _config(tmp_path, *flags, masks=True):
    folder = make_image_folder(tmp_path / "train", repeats=2, count=5, caption_extension=".txt")
    if masks:
        _masks_like_red(folder, tmp_path / "masks")
    return resolve(["--train_data_dir", str(tmp_path / "train"), "--caption_extension", ".txt",
                    "--train_batch_size", "2", *BUCKETS, "--masked_loss",
                    *(["--conditioning_data_dir", str(tmp_path / "masks")] if masks else []), *flags], NETWORK, OPTIONS)


def _epoch(dataset):
    return [dataset[i] for i in range(len(dataset))]


# ---- which image has which mask ----------------------------------------------------------------------------------

def test_each_training_image_gets_the_mask_of_its_name(tmp_path):
    plan = plan_run(_config(tmp_path))
    entries = plan.datasets[0].entries
    assert entries and all(e.mask_path == tmp_path / "masks" / e.path.name for e in entries)


def test_a_missing_mask_is_one_error_naming_it(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "masks" / "img003.png").unlink()
    with pytest.raises(UserError, match=r"has no mask for 1 of 5 images .*\(e\.g\. img003\.png\)"):
        plan_run(config)


def test_a_mask_of_another_size_is_refused(tmp_path):
    config = _config(tmp_path)
    Image.new("RGB", (10, 10)).save(tmp_path / "masks" / "img001.png")
    with pytest.raises(UserError, match=r"mask '.*img001\.png' is 10x10 but its image .* is 96x64"):
        plan_run(config)


def test_unused_masks_are_reported(tmp_path):
    config = _config(tmp_path)
    Image.new("RGB", (10, 10)).save(tmp_path / "masks" / "stray.png")
    assert any("match no image" in p and "stray.png" in p for p in plan_run(config).problems)


def test_masks_without_masked_loss_are_refused_and_masked_loss_without_masks_is_reported(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(UserError, match="used only with --masked_loss: add --masked_loss"):
        plan_run({**config, "masked_loss": False})
    assert any("the loss is not masked" in p for p in plan_run(_config(tmp_path / "b", masks=False)).problems)


# ---- masks follow their images -----------------------------------------------------------------------------------

def test_masks_follow_resize_bucket_crop_and_flip(tmp_path):
    dataset = TrainingDataset(plan_run(_config(tmp_path, "--flip_aug", "--random_crop")), seed=0)
    batches = _epoch(dataset)
    for batch in batches:
        red = (batch.images[:, 0] + 1) / 2  # back from [-1, 1]
        assert batch.alpha_masks.shape == red.shape
        torch.testing.assert_close(batch.alpha_masks, red, rtol=0, atol=1e-6)
    assert len({tuple(b.images.shape[-2:]) for b in batches}) > 1  # several buckets were exercised


def test_cached_latents_carry_the_masks_and_flip_them_with_the_image(tmp_path, tiny_parts):
    plan = plan_run(_config(tmp_path, "--flip_aug"))
    cache = LatentCache(to_disk=False, vae_identity="test")
    cache.encode_missing(latent_requests(plan), tiny_parts["tiny-sd1"].vae, batch_size=1, seed=0, device="cpu",
                         dtype=torch.float32)
    uncached, cached = _epoch(TrainingDataset(plan, seed=4)), _epoch(TrainingDataset(plan, seed=4, latent_cache=cache))
    flips = set()
    for plain, from_cache in zip(uncached, cached):
        assert plain.image_paths == from_cache.image_paths and from_cache.images is None
        torch.testing.assert_close(from_cache.alpha_masks, plain.alpha_masks, rtol=0, atol=1e-6)
        for path, mask, conditioning in zip(from_cache.image_paths, from_cache.alpha_masks, from_cache.conditioning):
            unflipped = cache.get(next(r for r in latent_requests(plan) if str(r.image_path) == path and
                                       tuple(r.bucket_reso) == conditioning.target_size[::-1])).alpha_mask
            flips.add(not torch.equal(mask, unflipped))
            assert torch.equal(mask, unflipped) or torch.equal(mask, unflipped.flip(-1))
    assert flips == {True, False}  # some images were mirrored, some not


def test_images_without_a_mask_weigh_one_beside_masked_ones(tmp_path):
    train = make_image_folder(tmp_path / "train", repeats=1, count=1, caption_extension=".txt", sizes=((64, 64),))
    make_image_folder(tmp_path / "reg", repeats=1, class_tokens="dog", count=1, sizes=((64, 64),))
    _halves(train, tmp_path / "masks")
    config = resolve(["--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
                      "--caption_extension", ".txt", "--train_batch_size", "2", "--resolution", "64", "--masked_loss",
                      "--conditioning_data_dir", str(tmp_path / "masks")], NETWORK, OPTIONS)
    batch, = _epoch(TrainingDataset(plan_run(config), seed=0))
    reg = batch.is_reg.tolist().index(True)
    assert torch.equal(batch.alpha_masks[reg], torch.ones(64, 64))
    assert torch.equal(batch.alpha_masks[1 - reg][:, :32], torch.zeros(64, 32))


# ---- the loss ----------------------------------------------------------------------------------------------------

def test_a_mask_of_zeros_over_half_the_image_leaves_no_gradient_there(tmp_path):
    folder = make_image_folder(tmp_path / "train", repeats=1, count=2, caption_extension=".txt", sizes=((64, 64),))
    _halves(folder, tmp_path / "masks")
    config = resolve(["--train_data_dir", str(tmp_path / "train"), "--caption_extension", ".txt", "--resolution", "64",
                      "--train_batch_size", "2", "--masked_loss", "--conditioning_data_dir", str(tmp_path / "masks")],
                     NETWORK, OPTIONS)
    batch, = _epoch(TrainingDataset(plan_run(config), seed=0))
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, _ = training_loss(pred, torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), batch.is_reg,
                            make_noise_scheduler(v_parameterization=False, zero_terminal_snr=False),
                            LossSettings.from_config(config), v_parameterization=False, loss_mask=batch.alpha_masks)
    loss.backward()
    assert torch.all(pred.grad[..., :4] == 0) and torch.all(pred.grad[..., 4:] != 0)


def _train(tmp_path, name, *extra):
    return train_network.main([
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "train"),
        "--caption_extension", ".txt", "--resolution", "32", "--output_dir", str(tmp_path / name), "--output_name",
        "net", "--max_train_steps", "2", "--learning_rate", "1e-3", "--network_dim", "4", "--seed", "3",
        "--max_data_loader_n_workers", "0", "--cache_latents", *extra]).losses


def test_training_reads_the_masks_through_the_latent_cache(tmp_path):
    folder = make_image_folder(tmp_path / "train", repeats=1, count=2, caption_extension=".txt", sizes=((32, 32),))
    _halves(folder, tmp_path / "white", left=255, right=255)
    _halves(folder, tmp_path / "black", left=0, right=0)
    plain = _train(tmp_path, "plain")
    # A white mask weighs everything 1: the unmasked run's losses exactly; a black one leaves no loss at all.
    assert _train(tmp_path, "w", "--masked_loss", "--conditioning_data_dir", str(tmp_path / "white")) == plain
    assert _train(tmp_path, "b", "--masked_loss", "--conditioning_data_dir", str(tmp_path / "black")) == [0.0, 0.0]
    assert plain != [0.0, 0.0]


def test_a_changed_mask_is_encoded_again_not_read_stale_from_disk(tmp_path, tiny_parts):
    config = _config(tmp_path)
    plan = plan_run(config)
    cache = LatentCache(to_disk=True, vae_identity="test")
    cache.encode_missing(latent_requests(plan), tiny_parts["tiny-sd1"].vae, batch_size=2, seed=0, device="cpu",
                         dtype=torch.float32)
    assert cache.missing(latent_requests(plan_run(config))) == []
    mask = tmp_path / "masks" / "img002.png"
    Image.new("RGB", Image.open(mask).size).save(mask)
    stale = cache.missing(latent_requests(plan_run(config)))
    assert [r.image_path.name for r in stale] == ["img002.png"]
