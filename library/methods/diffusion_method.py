"""What every training method shares: latents (cached or encoded), caption conditioning, noise, target and loss.

A method is what the loop talks to: `param_groups()`, `trainable_params()`, `loss(batch, generator)`,
`export(path, ...)`, and the hooks below. Subclasses decide what trains (an adapter network, the whole UNet...).
"""

from __future__ import annotations

import contextlib

import torch

from library.config.run_config import RunConfig
from library.data.caption_variants import CaptionVariants, plan_text_cache, varies
from library.data.dataset import Batch, fixed_captions
from library.data.plan import RunPlan
from library.models.components import Components
from library.models.family import TextConditioning
from library.training.concept_losses import ConceptLosses, concept_labels
from library.training.losses import LossSettings, training_loss
from library.training.memory import release_freed_memory
from library.training.noise import (
    NoiseSettings,
    draw_noise,
    make_noise_scheduler,
    target_for,
)



class DiffusionMethod:
    # Whether the VAE is needed after latents are cached even when nothing is sampled (a full model save is).
    keeps_vae = False
    # Applied to every training caption after the usual processing: (caption, image entry, rng) -> caption.
    caption_transform = None
    keeps_text_encoders = False  # True: every save writes them (a full model), so they stay loaded
    # Steps a resumed embedding or hypernetwork already had: its schedule and saved step count continue from there.
    step_offset = 0

    def __init__(self, config: RunConfig, parts: Components, device: torch.device, weight_dtype: torch.dtype,
                 plan: RunPlan | None, *, train_text_encoder: bool):
        self.config, self.parts, self.device, self.weight_dtype = config, parts, device, weight_dtype
        self.train_text_encoder = train_text_encoder
        self.scheduler = make_noise_scheduler(v_parameterization=parts.v_parameterization,
                                              zero_terminal_snr=bool(config.zero_terminal_snr))
        # Read once: loss() runs every step.
        self.noise_settings = NoiseSettings.from_config(config)
        self.loss_settings = LossSettings.from_config(config)
        self._text_cache: dict[str, TextConditioning] = {}
        subsets = [s for d in plan.datasets for s in d.spec.subsets] if plan is not None else []
        self._fixed_captions = plan is not None and not any(varies(s) for s in subsets)
        # --caption_variants: with a text-encoder cache and captions that vary, the captions each image may take
        # (drawn up front, encoded once); the datasets pick among them. Set by texts_ready.
        self.caption_variants: CaptionVariants | None = None
        # captions -> hidden states (sampling's prompt embeddings); `.conditioning(captions)` adds what else the
        # family's UNet takes from the text (a pooled embedding where it has one).
        self.encode_prompts = self.prompt_encoder_for(parts)
        # Per-concept progress: each training sample's loss by subset (TensorBoard) and by image (the end-of-run list).
        self.concept_losses = ConceptLosses(concept_labels(plan)) if plan is not None else None

    def prompt_encoder_for(self, parts: Components):
        """The run's prompt encoding (--clip_skip, --max_token_length, --weighted_captions) over `parts`' encoders."""
        config = self.config
        return parts.family.prompt_encoder(parts, clip_skip=config.clip_skip, max_token_length=config.max_token_length,
                                           weighted=bool(config.get("weighted_captions")))

    # ------------------------------------------------------------------ hooks the loop calls
    def latents_ready(self, *, all_cached: bool) -> None:
        """Called once the latent cache is set up, and (when latents are encoded as training first needs them) once
        more with all_cached=True after the step that stored the last one. If every latent is cached and nothing
        samples, the VAE is released (or, for a method whose saves write it, moved to the CPU), so its memory goes to
        training (0.33 GB in float32)."""
        if all_cached and not self.config.sample_prompts:
            if self.keeps_vae:
                self.parts.vae.to("cpu")  # only the saves need it now: off the accelerator (sd-scripts does too)
            else:
                self.parts.vae = None
        elif not self.config.sample_prompts and not self.keeps_vae and self.parts.vae is not None:
            # Latents still to encode (as batches first need them, or every step): nothing decodes in this run, so
            # the decoder goes now (0.2 GB of the SD VAE's 0.33 in float32); an accidental decode fails loudly.
            self.parts.vae.decoder = None
            self.parts.vae.post_quant_conv = None
        release_freed_memory()  # the VAE's activations (and the VAE) while caching: ~1 GB kept by malloc at 512 px

    def texts_ready(self, plan: RunPlan) -> None:
        """--cache_text_encoder_outputs(_to_disk): every caption is encoded (or its file read) before the first step,
        as sd-scripts does; then, when nothing will sample, the text encoders are released (SDXL's are 3 GB in
        float32). Called before the latents are cached, so the VAE runs without the text encoders beside it (the
        run's peak memory). Captions that vary are cached as --caption_variants (a trained text encoder, token warm-up
        and, on disk, varying captions were refused with these flags already). Held-out (validation) images' captions
        are encoded too: validation runs after the encoders are gone.

        Without the flags, the same happens when it only saves memory: a frozen text encoder, captions that never
        change and nothing that samples or saves the encoders. Such a run encodes each caption once anyway (in memory,
        the first time a batch has it), so the results are the same; the encoders' memory (SD 1.x: 0.49 GB in float32,
        SDXL: 3 GB) goes to training instead of sitting idle beside it."""
        config = self.config
        asked = config.get("cache_text_encoder_outputs") or config.get("cache_text_encoder_outputs_to_disk")
        if self.train_text_encoder:
            return
        if not (asked or self._caching_frees_text_encoders()):
            return
        if self._fixed_captions:
            pairs = fixed_captions(plan, max_train_steps=config.max_train_steps,
                                   caption_transform=self.caption_transform)
            size = max(d.spec.batch_size for d in plan.datasets)
            for start in range(0, len(pairs), size):
                paths, captions = zip(*pairs[start:start + size])
                if config.get("cache_text_encoder_outputs_to_disk"):
                    self._read_or_write_files(list(captions), list(paths))
                self._encode_into_cache(captions)
        elif config.get("caption_variants") != 0:
            self._cache_caption_variants(plan)
        else:  # --caption_variants 0 with a caption template: each step encodes its captions, as without the cache
            return
        released = not config.sample_prompts and not self.keeps_text_encoders
        if released:
            for text_encoder in self.parts.text_encoders:
                text_encoder.to("meta")  # frees the weights; any later use fails loudly instead of reading garbage
            release_freed_memory()
        elif not config.sample_prompts:
            for text_encoder in self.parts.text_encoders:
                text_encoder.to("cpu")  # only the saves need them now: off the accelerator (sd-scripts does too)
        print(f"text encoder outputs: {len(self._text_cache)} captions cached before training"
              + ("; text encoders released (nothing samples)" if released else ""))

    def _caching_frees_text_encoders(self) -> bool:
        """Whether encoding every caption up front lets the text encoders go with nothing else changed (see
        texts_ready): captions fixed, nothing samples, no save writes the encoders (Dreambooth's, whose
        --no_token_padding bypasses the cache, do)."""
        return self._fixed_captions and not self.config.sample_prompts and not self.keeps_text_encoders

    def _encode_into_cache(self, captions) -> None:
        """Each of `captions` not cached yet encoded (no gradient) into the in-memory cache, in sorted order."""
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:
            with torch.no_grad():
                self._text_cache.update(zip(missing, self.encode_prompts.conditioning(missing).rows()))

    def _cache_caption_variants(self, plan: RunPlan) -> None:
        """--caption_variants: draw each varying caption's variants (training and held-out images), encode them and
        every fixed caption, in batches of the largest batch size."""
        config = self.config
        cache = plan_text_cache((e for d in [*plan.datasets, *plan.validation] for e in d.entries),
                                family=self.parts.family, max_token_length=config.max_token_length,
                                element_bytes=self.weight_dtype.itemsize, option=config.get("caption_variants"),
                                seed=config.seed or 0, max_train_steps=config.max_train_steps,
                                caption_transform=self.caption_transform)
        self.caption_variants = cache.variants
        print(cache.describe())
        captions = cache.captions()
        size = max(d.spec.batch_size for d in plan.datasets)
        for start in range(0, len(captions), size):
            self._encode_into_cache(captions[start:start + size])

    def before_step(self, global_step: int) -> None:
        """Called before the batches of optimizer step `global_step + 1`."""

    def after_step(self, global_step: int) -> None:
        """Called after optimizer step `global_step`."""

    def step_logs(self) -> dict[str, float]:
        """Extra scalars for the step just taken, logged with the loss: the loss per concept (subset)."""
        return self.concept_losses.step_logs() if self.concept_losses is not None else {}

    def checkpoint_objects(self) -> list:
        """What `--save_state` saves besides optimizer, scheduler and RNG (objects with state_dict/load_state_dict)."""
        return []

    def sampling_modules(self) -> tuple[torch.nn.Module, ...]:
        """Modules besides UNet, VAE and text encoder that take part in sampling (eval mode, device)."""
        return ()

    # ------------------------------------------------------------------ the loss
    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        family = self.parts.family
        latents = self._latents(batch, generator) * family.latent_scale
        text = self._text_conditioning(batch.captions, batch.image_paths)
        draw = draw_noise(self.scheduler, latents, self.noise_settings, generator)
        with self._offloaded_saves():
            pred = family.predict(self.parts.unet, draw.noisy_latents, draw.timesteps, text, batch.conditioning)
        target = target_for(self.scheduler, latents, draw.noise, draw.timesteps,
                            v_parameterization=self.parts.v_parameterization)
        # Masks come with the batch when any of its images has one (alpha_mask, or conditioning_data_dir with
        # --masked_loss); sd-scripts applies them whenever they are there too.
        loss, per_sample = training_loss(pred, target, draw.timesteps, batch.is_reg, self.scheduler,
                                         self.loss_settings, v_parameterization=self.parts.v_parameterization,
                                         loss_mask=batch.alpha_masks)
        if self.concept_losses is not None and torch.is_grad_enabled():  # training, not validation or a probe
            self.concept_losses.add(batch.image_paths, per_sample)
        return loss

    def _offloaded_saves(self):
        """--cpu_offload_checkpointing: what autograd keeps of the U-Net's forward for backward (under gradient
        checkpointing, the blocks' inputs) waits in CPU memory, pinned on a GPU machine, and comes back as backward
        needs it; a CPU run's tensors are there already."""
        if not self.config.get("cpu_offload_checkpointing") or self.device.type == "cpu" or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def _text_conditioning(self, captions: list[str], image_paths: list[str]) -> TextConditioning:
        if self.config.get("no_token_padding"):  # each batch at its own length: nothing to keep per caption
            with torch.set_grad_enabled(self.train_text_encoder):
                return self.encode_prompts.unpadded(captions)
        if self.train_text_encoder:
            return self.encode_prompts.conditioning(captions)
        if self._fixed_captions and self.config.get("cache_text_encoder_outputs_to_disk"):
            self._read_or_write_files(captions, image_paths)
        if self._fixed_captions or self.caption_variants is not None:
            # A frozen text encoder and captions that never change (or one of their cached variants): each caption
            # is encoded once, in memory.
            self._encode_into_cache(captions)
            return TextConditioning.stack([self._text_cache[c] for c in captions])
        with torch.no_grad():
            return self.encode_prompts.conditioning(captions)

    def _read_or_write_files(self, captions: list[str], image_paths: list[str]) -> None:
        """--cache_text_encoder_outputs_to_disk: each image's file is read (or written) the first time it is seen;
        the in-memory cache then serves its caption."""
        from library.training.text_outputs import TextOutputFiles

        if not hasattr(self, "_text_files"):
            self._text_files = TextOutputFiles(self.parts, self.encode_prompts.encoder_identity(),
                                               skip_check=bool(self.config.get("skip_cache_check")))
            self._files_seen: set[str] = set()
        todo = [(p, c) for p, c in zip(image_paths, captions) if p not in self._files_seen]
        dtype = self.parts.text_encoders[0].dtype
        missing = []
        for path, caption in todo:
            row = self._text_files.read(path, caption)
            if row is None:
                missing.append((path, caption))
            elif caption not in self._text_cache:
                pooled = None if row.pooled is None else row.pooled.to(self.device, dtype)
                self._text_cache[caption] = TextConditioning(row.hidden.to(self.device, dtype), pooled)
        self._encode_into_cache(c for _, c in missing)
        for path, caption in missing:
            self._text_files.write(path, caption, self._text_cache[caption])
        self._files_seen.update(p for p, _ in todo)

    def _latents(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if batch.latents is not None:
            # non_blocking: the host must not wait on the copy (a pageable source is staged first, so the batch
            # may be freed at once); a plain .to() makes the host wait for the device every step
            return batch.latents.to(self.device, self.weight_dtype, non_blocking=True)
        vae = self.parts.vae
        with torch.no_grad():
            images = batch.images.to(self.device, vae.dtype, non_blocking=True)
            return vae.encode(images).latent_dist.sample(generator=generator).to(self.weight_dtype)


def freeze_models(parts: Components, device: torch.device, weight_dtype: torch.dtype, *, no_half_vae: bool) -> None:
    """Every model part frozen, on the device, in the weight dtype; the VAE stays float32 with --no_half_vae (SD's
    VAE overflows in fp16; sd-scripts keeps it in float32 on request). Methods then unfreeze what they train."""
    for module in parts.modules():
        module.requires_grad_(False).to(device=device, dtype=weight_dtype)
    if no_half_vae and parts.vae is not None:
        parts.vae.to(dtype=torch.float32)
