"""Every option the entry scripts accept, declared once: sd-scripts' names, types, defaults and choices, plus ours."""

from __future__ import annotations

from library.config.options import (ALL_SCRIPTS, DB, FILE_NAME, HYPERNETWORK, INPUT_PATH, NETWORK, OUTPUT_DIR, TI,
                                    IntOrFloat, Numbers, Option)

# Which entry scripts accept an option (sd-scripts' split; hypernetwork takes the shared train_util options).
ALL = ALL_SCRIPTS
NET = frozenset({NETWORK})
DB_ONLY = frozenset({DB})
TI_ONLY = frozenset({TI})
HN_ONLY = frozenset({HYPERNETWORK})
EMB = frozenset({TI, HYPERNETWORK})  # embeddings and hypernetworks share A1111's schedule, templates and --weights
NOT_TI = frozenset({NETWORK, DB, HYPERNETWORK})
POSTHOC = frozenset({NETWORK, TI, HYPERNETWORK})  # what --posthoc_ema snapshots (a full model per snapshot is too big)  # sd-scripts' TI has no caption dropout nor weighted captions

SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A1111's named activations plus the torch.nn activations that work without arguments and keep the width.
HYPERNETWORK_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "celu", "gelu",
                            "hardshrink", "hardsigmoid", "hardswish", "hardtanh", "logsigmoid", "mish", "prelu",
                            "relu6", "rrelu", "selu", "silu", "softplus", "softshrink", "softsign", "tanhshrink")
HYPERNETWORK_WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")

# Accepted so sd-scripts configs load, refused when set: no issue implements these yet.
NOT_SUPPORTED = "is not supported yet"

# Bounds the constraints below share (checked by library/config/checks.py before any weights load).
MOST_SEED = 2**32 - 1  # numpy's and accelerate's set_seed take 0 .. 2**32 - 1
TIMESTEPS = 1000  # the SD 1.x/2.x noise schedule's length: timesteps are 0 .. 999
MOST_TEXT_ENCODER_LAYERS = 24  # SD 2.x's OpenCLIP (SD 1.x's CLIP has 12); the model's own count is checked at load
# An epoch lists every image num_repeats times; more than this fills memory for nothing (train more epochs instead).
MOST_REPEATS = 10_000
# Saved names add up to ~45 bytes to output_name (".<name>-step00000001-state.XXXXXXXX.tmp"); a name is <= 255.
MOST_NAME_BYTES = 200
MODULE_NAME = (r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", "a Python module name such as networks.lora")

# A config-file value GUIs write for "not set" where 0 itself is out of range (kohya_ss writes `x if x != 0 else
# None`, lora-scripts save_n_epoch_ratio = 0, kohya_ss's config example vae_batch_size = 0): the default applies.
GUI_UNSET = (0,)

# Options that act only with another one set: GUIs write them with that one left empty (config_file.is_inert).
HF_UPLOAD = ("huggingface_repo_id", None)
DEEPSPEED = ("deepspeed", None)

ADAPTERS_USE_DDP = ("is for full fine-tuning (train_db.py, sdxl_train.py): an adapter is small enough for DDP over "
                    "several processes")
FP8_FOR_ADAPTERS = ("is for adapters on a frozen base model (train_network.py, as in sd-scripts): a full fine-tune "
                    "trains the weights it would store in float8")
HF_NOT_BUILT = ("is not supported: uploading to the Hugging Face Hub is not built (nothing here can reach or stand in "
                "for the Hub to test it); upload the saved files afterwards with `hf upload <repo_id> <output_dir>`")
HF_RESUME_NOT_BUILT = ("is not supported: states are not read from the Hugging Face Hub; download the -state folder "
                       "with `hf download <repo_id> --include '<name>-state/*' --local-dir <folder>` and --resume it")
SECRET_IN_FILES = "is a secret; a value here would be copied into the resolved config saved with the outputs"

OPTIONS: tuple[Option, ...] = (
    # --- model: what is loaded (add_sd_models_arguments, --vae, text-encoder reading) ---
    Option("pretrained_model_name_or_path", str, None,
           "base model: .safetensors/.ckpt file, diffusers folder, hub id, or tiny-sd1/tiny-sd2 (built-in demo)", "model",
           path=INPUT_PATH),
    Option("v2", bool, False, "the base model is SD 2.x (detected from the tensors; this flag insists on it)", "model"),
    Option("v_parameterization", bool, False, "the base model predicts v (SD 2.x 768-v models)", "model"),
    Option("vae", str, None, "replace the model's VAE with this file or diffusers folder", "model", path=INPUT_PATH),
    Option("tokenizer", str, None, "tokenizer folder or hub id (default: the bundled CLIP tokenizer)", "model",
           path=INPUT_PATH),
    Option("tokenizer_cache_dir", str, None,
           "accepted and unused: the CLIP tokenizer ships with sd-trainer, so nothing is downloaded or cached", "model",
           path=INPUT_PATH),
    Option("clip_skip", int, None, "use the text encoder's n-th layer from the end (1 = last; 2 is common)",
           "model", minimum=1, maximum=MOST_TEXT_ENCODER_LAYERS, off=GUI_UNSET),
    Option("max_token_length", int, None, "longer captions: 150 or 225 tokens as 75-token chunks (default 75)", "model",
           choices=(150, 225), off=(75,)),
    Option("no_half_vae", bool, False, "keep the VAE in float32 under mixed precision", "model"),
    Option("disable_mmap_load_safetensors", bool, False,
           "accepted and ignored (sd-scripts' SDXL loader switch): models are read tensor by tensor either way",
           "model"),

    # --- dataset: folders, metadata, sizes, buckets, augmentation, loading (add_dataset_arguments) ---
    Option("train_data_dir", str, None, "folder of training images (subfolders named <repeats>_<class tokens>)", "dataset",
           path=INPUT_PATH),
    Option("reg_data_dir", str, None, "folder of regularization images, same layout as train_data_dir", "dataset",
           path=INPUT_PATH),
    Option("in_json", str, None, "fine-tuning metadata .json/.jsonl (captions, tags, sizes) for train_data_dir", "dataset",
           path=INPUT_PATH),
    Option("dataset_repeats", int, 1, "times each image of an --in_json dataset repeats per epoch", "dataset",
           minimum=0, maximum=MOST_REPEATS),
    Option("dataset_config", str, None, "dataset TOML/JSON ([general], [[datasets]], [[datasets.subsets]])", "dataset",
           path=INPUT_PATH),
    Option("dataset_class", str, None, "a Python class that builds the dataset (package.module.Class)", "dataset",
           note="is not supported: custom dataset classes cannot be plugged in; describe the data with --dataset_config"),
    Option("resolution", str, None, "training size: 'size' or 'width,height' (e.g. 512 or 512,768)", "dataset",
           numbers=Numbers(int, (1, 2)), minimum=8),
    Option("train_batch_size", int, 1, "images per batch", "dataset", minimum=1),
    Option("enable_bucket", bool, False, "group images into aspect-ratio buckets instead of cropping to one size", "dataset"),
    Option("min_bucket_reso", int, 256, "smallest bucket side, a multiple of bucket_reso_steps", "dataset", minimum=1),
    Option("max_bucket_reso", int, 1024, "largest bucket side, a multiple of bucket_reso_steps", "dataset", minimum=1),
    Option("bucket_reso_steps", int, 64, "bucket sides step by this many pixels", "dataset", minimum=1),
    Option("bucket_no_upscale", bool, False, "never enlarge an image to fit a bucket", "dataset"),
    Option("resize_interpolation", str, None, "resampling filter for resizing (default: area when shrinking, else lanczos)",
           "dataset", choices=RESIZE_INTERPOLATIONS),
    Option("color_aug", bool, False, "random small hue or gamma changes (turns off latent caching)", "dataset"),
    Option("flip_aug", bool, False, "randomly mirror images left-right", "dataset"),
    Option("face_crop_aug_range", str, None, "crop around the face at a random scale in 'min,max' (e.g. 2.0,4.0)",
           "dataset", numbers=Numbers(float, (2,), ascending=True), above=0),
    Option("random_crop", bool, False, "crop at a random place, not the centre (turns off latent caching)", "dataset"),
    Option("alpha_mask", bool, False, "use each image's alpha channel as the loss mask", "dataset"),
    Option("conditioning_data_dir", str, None, "folder of mask images for --masked_loss (red channel = weight)", "dataset",
           path=INPUT_PATH),
    Option("max_data_loader_n_workers", int, 8, "most worker processes that load images", "dataset", minimum=0),
    Option("persistent_data_loader_workers", bool, False, "keep loader workers alive between epochs", "dataset"),
    Option("validation_split", float, 0.0, "fraction of training images held out for validation", "dataset", scripts=NET,
           minimum=0, below=1),
    Option("validation_seed", int, None, "seed that picks the validation images (default: --seed)", "dataset", scripts=NET,
           minimum=0, maximum=MOST_SEED),
    Option("debug_dataset", bool, False, "show the prepared images instead of training", "dataset",
           note="is not supported (it opens image windows); --dry_run checks the data without training"),
    Option("strict", bool, False, "a corrupt or unreadable image stops the run instead of being skipped", "dataset"),

    # --- captions: file lookup and per-step processing ---
    Option("caption_extension", str, ".caption", "extension of the caption file next to each image", "captions"),
    Option("caption_extention", str, None, "old misspelt name of --caption_extension, still read (with a warning) as "
           "sd-scripts does: it wins over --caption_extension", "captions"),
    Option("shuffle_caption", bool, False, "shuffle the caption's tags every step", "captions"),
    Option("caption_separator", str, ",", "separator between the caption's tags", "captions"),
    Option("keep_tokens", int, 0, "keep the first N tags in place when shuffling or dropping", "captions", minimum=0),
    Option("keep_tokens_separator", str, "", "tags before this mark stay fixed (a second mark fixes a suffix)", "captions"),
    Option("secondary_separator", str, None, "separator that groups tags into one; becomes caption_separator after shuffle",
           "captions"),
    Option("enable_wildcard", bool, False, "{a|b|c} picks one choice per step; a multi-line caption picks a line",
           "captions"),
    Option("caption_prefix", str, None, "text put before every caption", "captions"),
    Option("caption_suffix", str, None, "text put after every caption", "captions"),
    Option("caption_dropout_rate", float, 0.0, "chance to train a step with an empty caption", "captions", scripts=NOT_TI,
           minimum=0, maximum=1),
    Option("caption_dropout_every_n_epochs", int, 0, "drop all captions every N-th epoch", "captions", scripts=NOT_TI,
           minimum=0),
    Option("caption_tag_dropout_rate", float, 0.0, "chance to drop each (non-kept) tag", "captions", scripts=NOT_TI,
           minimum=0, maximum=1),
    Option("token_warmup_min", int, 1, "start with this many tags, growing to all of them", "captions", minimum=0),
    Option("token_warmup_step", float, 0.0, "step at which all tags are used (below 1: fraction of max_train_steps)",
           "captions", minimum=0),
    Option("weighted_captions", bool, False, "read (tag:1.3), (tag) and [tag] as attention weights in captions",
           "captions", scripts=NOT_TI),

    # --- caching: latents, text-encoder outputs, dataset metadata ---
    Option("cache_latents", bool, False, "encode images with the VAE once and keep the latents in memory", "caching"),
    Option("cache_latents_to_disk", bool, False, "cache latents in .npz files beside the images (implies cache_latents)",
           "caching"),
    Option("vae_batch_size", int, 1, "images per VAE batch while caching latents", "caching", minimum=1, off=GUI_UNSET),
    Option("skip_cache_check", bool, False, "trust existing cache files without checking their contents", "caching"),
    Option("cache_text_encoder_outputs", bool, False, "encode each caption once when the text encoder is not trained",
           "caching", scripts=NOT_TI),
    Option("cache_text_encoder_outputs_to_disk", bool, False,
           "also keep each image's text-encoder outputs in a file beside it (SDXL: sd-scripts' <stem>_te_outputs.npz; "
           "implies cache_text_encoder_outputs)", "caching", scripts=NOT_TI),
    Option("caption_variants", int, None,
           "with --cache_text_encoder_outputs and captions that vary (shuffle, tag or caption dropout, wildcards, "
           "templates): how many captions per image are drawn and cached, one picked each step (default: up to 16, "
           "as many as fit 1 GiB; 0 refuses the combination, as sd-scripts does)", "caching", scripts=NOT_TI,
           minimum=0),
    Option("cache_info", bool, False, "remember captions and image sizes in metadata_cache.json for faster starts",
           "caching"),

    # --- training: length, precision, noise, timesteps, loss (add_training_arguments, custom_train_functions) ---
    Option("max_train_steps", int, 1600, "optimizer steps to train", "training", minimum=1, off=GUI_UNSET),
    Option("max_train_epochs", int, None, "epochs to train (overrides max_train_steps)", "training", minimum=1,
           off=GUI_UNSET),
    Option("seed", int, None, "random seed of the run", "training", minimum=0, maximum=MOST_SEED),
    Option("gradient_checkpointing", bool, False, "recompute activations in backward to save memory", "training"),
    Option("gradient_accumulation_steps", int, 1, "batches whose gradients add up before each optimizer step", "training",
           minimum=1),
    Option("mixed_precision", str, "no", "compute in fp16 or bf16 where safe", "training", choices=("no", "fp16", "bf16")),
    Option("full_fp16", bool, False, "keep trained weights and gradients in fp16 too", "training",
           requires=("mixed_precision", "fp16")),
    Option("full_bf16", bool, False, "keep trained weights and gradients in bf16 too", "training",
           requires=("mixed_precision", "bf16")),
    Option("fp8_base", bool, False, "store the frozen base model's weights in float8 (computed in the training dtype)",
           "training", note_per_script=tuple((script, FP8_FOR_ADAPTERS) for script in (DB, TI, HYPERNETWORK))),
    Option("fp8_base_unet", bool, False, "store only the frozen U-Net in float8, the text encoder as usual",
           "training", scripts=NET),
    Option("noise_offset", float, None, "add this much per-channel offset to the noise (about 0.1)", "training",
           minimum=0),
    Option("noise_offset_random_strength", bool, False, "draw the noise offset between 0 and noise_offset", "training"),
    Option("adaptive_noise_scale", float, None, "add this times the latent's mean magnitude to noise_offset", "training",
           requires=("noise_offset", None)),
    Option("multires_noise_iterations", int, None, "add multi-resolution noise with this many levels (6-10)", "training",
           minimum=0),
    Option("multires_noise_discount", float, 0.3, "weight decay per level of multi-resolution noise", "training",
           minimum=0, maximum=1),
    Option("ip_noise_gamma", float, None, "input-perturbation noise strength (about 0.1)", "training", minimum=0),
    Option("ip_noise_gamma_random_strength", bool, False, "draw ip_noise_gamma between 0 and its value", "training"),
    Option("zero_terminal_snr", bool, False, "rescale the noise schedule so the last step is pure noise", "training"),
    Option("min_timestep", int, None, "lowest timestep sampled (default 0)", "training",
           minimum=0, maximum=TIMESTEPS - 1, not_above="max_timestep"),
    Option("max_timestep", int, None, "timesteps sampled stay below this (default 1000)", "training",
           minimum=1, maximum=TIMESTEPS, off=GUI_UNSET),
    Option("loss_type", str, "l2", "loss between prediction and target", "training",
           choices=("l1", "l2", "huber", "smooth_l1")),
    Option("huber_schedule", str, "snr", "how the Huber parameter changes with the timestep", "training",
           choices=("constant", "exponential", "snr")),
    Option("huber_c", float, 0.1, "Huber loss parameter c", "training", above=0),
    Option("huber_scale", float, 1.0, "Huber loss scale", "training", above=0),
    Option("min_snr_gamma", float, None, "min-SNR loss weighting with this gamma (5 is usual)", "training", minimum=0),
    Option("scale_v_pred_loss_like_noise_pred", bool, False, "weight the v-prediction loss like an epsilon loss",
           "training"),
    Option("v_pred_like_loss", float, None, "add a v-prediction-like loss term times this value", "training",
           minimum=0),
    Option("debiased_estimation_loss", bool, False, "weight the loss by 1/sqrt(SNR)", "training"),
    Option("masked_loss", bool, False, "weight the loss by the masks from conditioning_data_dir or alpha_mask", "training"),
    Option("prior_loss_weight", float, 1.0, "loss weight of regularization images", "training", minimum=0),
    Option("validate_every_n_steps", int, None, "also validate every N steps (default: every epoch)", "training",
           scripts=NET, minimum=1),
    Option("validate_every_n_epochs", int, None, "validate every N epochs (default: every epoch)", "training",
           scripts=NET, minimum=1),
    Option("max_validation_steps", int, None, "most validation batches per validation (default: all)", "training",
           scripts=NET, minimum=1),
    Option("initial_epoch", int, None, "number the first epoch this (1 = start); the lr schedule still starts at 0",
           "training", scripts=NET, minimum=1),
    Option("initial_step", int, None, "number the first step this (0 = from the start); overrides initial_epoch",
           "training", scripts=NET, minimum=0),
    Option("skip_until_initial_step", bool, False, "skip the batches before initial_step", "training", scripts=NET),

    # --- optimizer and learning-rate schedule (add_optimizer_arguments, per-part rates) ---
    Option("optimizer_type", str, "", "AdamW (default), AdamW8bit, Lion, Prodigy, AdaFactor, ... or module.Class",
           "optimizer"),
    Option("use_8bit_adam", bool, False, "old spelling of --optimizer_type AdamW8bit", "optimizer"),
    Option("use_lion_optimizer", bool, False, "old spelling of --optimizer_type Lion", "optimizer"),
    Option("learning_rate", float, 2.0e-6, "learning rate", "optimizer", minimum=0),
    Option("unet_lr", float, None, "learning rate of the U-Net part (default: learning_rate)", "optimizer", scripts=NET,
           minimum=0),
    Option("text_encoder_lr", float, None, "learning rate of the text-encoder part (default: learning_rate)", "optimizer",
           nargs="*", scripts=NET, minimum=0),
    Option("max_grad_norm", float, 1.0, "clip gradients to this norm (0 = no clipping)", "optimizer",
           minimum=0, allow_inf=True),
    Option("optimizer_args", str, None, "extra optimizer arguments as key=value (e.g. weight_decay=0.01)", "optimizer",
           nargs="*"),
    Option("fused_backward_pass", bool, False, "step each parameter inside backward and free its gradient at once "
           "(less memory; no gradient accumulation, one process)", "optimizer"),
    Option("lr_scheduler", str, "constant", "lr schedule: constant, constant_with_warmup, linear, cosine, "
           "cosine_with_restarts, polynomial, adafactor, ...", "optimizer"),
    Option("lr_warmup_steps", IntOrFloat, 0, "warmup steps, or a fraction of all steps when below 1 (or '10%')",
           "optimizer", minimum=0),
    Option("lr_decay_steps", IntOrFloat, 0, "decay steps, or a fraction of all steps when below 1 (or '25%')",
           "optimizer", minimum=0),
    Option("lr_scheduler_num_cycles", int, 1, "restarts of cosine_with_restarts", "optimizer", minimum=1),
    Option("lr_scheduler_power", float, 1.0, "power of the polynomial schedule", "optimizer", minimum=0),
    Option("lr_scheduler_timescale", int, None, "timescale of inverse_sqrt (default: warmup steps)", "optimizer",
           minimum=1),
    Option("lr_scheduler_min_lr_ratio", float, None, "lowest lr as a fraction of the initial lr (cosine_with_min_lr, "
           "warmup_stable_decay)", "optimizer", minimum=0, maximum=1),
    Option("lr_scheduler_type", str, "", "a scheduler class (module.Class) instead of --lr_scheduler", "optimizer"),
    Option("lr_scheduler_args", str, None, "extra scheduler arguments as key=value", "optimizer", nargs="*"),

    # --- network: the adapter trained by train_network (train_network.py setup_parser) ---
    Option("network_module", str, None, "adapter module, e.g. networks.lora or lycoris.kohya", "network", scripts=NET,
           pattern=MODULE_NAME),
    Option("network_dim", int, None, "adapter rank (default: the module's, 4 for networks.lora)", "network", scripts=NET,
           minimum=1),
    Option("network_alpha", float, 1.0, "adapter alpha; the update is scaled by alpha/dim", "network", scripts=NET,
           minimum=0),
    Option("network_dropout", float, None, "dropout of the adapter's hidden units (0 or none = off)", "network",
           scripts=NET, minimum=0, below=1),
    Option("network_args", str, None, "extra adapter arguments as key=value (conv_dim=..., algo=..., ...)", "network",
           nargs="*", scripts=NET),
    Option("network_weights", str, None, "start from these adapter weights", "network", scripts=NET, path=INPUT_PATH),
    Option("dim_from_weights", bool, False, "take the rank from --network_weights", "network", scripts=NET),
    Option("train_embeddings", str, None,
           "pivotal tuning: new token embeddings trained with the network, each TOKEN:N[:INIT WORDS] (N vectors, "
           "initialised from the init words); bundled into the network file as AUTOMATIC1111 reads them and written "
           "as embedding files beside it (ours)", "network", scripts=NET, nargs="+"),
    Option("embedding_lr", float, None, "learning rate of --train_embeddings' vectors (default: --learning_rate)",
           "network", scripts=NET, minimum=0),
    Option("network_train_unet_only", bool, False, "train only the U-Net part of the adapter", "network", scripts=NET),
    Option("network_train_text_encoder_only", bool, False, "train only the text-encoder part of the adapter", "network",
           scripts=NET),
    Option("base_weights", str, None, "adapter files merged into the model before training", "network", nargs="*",
           scripts=NET, path=INPUT_PATH),
    Option("base_weights_multiplier", float, None, "strength of each --base_weights file", "network", nargs="*",
           scripts=NET),
    Option("scale_weight_norms", float, None, "rescale adapter weights whose norm exceeds this (max-norm, about 1)",
           "network", scripts=NET, minimum=0),
    Option("loraplus_lr_ratio", float, None, "LoRA+ lr ratio of up weights to down weights", "network", scripts=NET,
           note="is a --network_args key in sd-scripts: write --network_args loraplus_lr_ratio=N", above=0,
           off=GUI_UNSET),
    Option("loraplus_unet_lr_ratio", float, None, "LoRA+ lr ratio for the U-Net part", "network", scripts=NET,
           note="is a --network_args key in sd-scripts: write --network_args loraplus_unet_lr_ratio=N", above=0,
           off=GUI_UNSET),
    Option("loraplus_text_encoder_lr_ratio", float, None, "LoRA+ lr ratio for the text-encoder part", "network",
           scripts=NET,
           note="is a --network_args key in sd-scripts: write --network_args loraplus_text_encoder_lr_ratio=N",
           above=0, off=GUI_UNSET),

    # --- saving: outputs, cadence, state and resume, upload, metadata ---
    Option("output_dir", str, None, "folder for the outputs", "saving", path=OUTPUT_DIR),
    Option("output_name", str, None, "file name of the output, without extension", "saving",
           path=FILE_NAME, max_bytes=MOST_NAME_BYTES),
    Option("save_model_as", str, None, "output format (default: safetensors for networks, pt for TI (safetensors "
           "for SDXL TI, which refuses pt), the input's format for train_db)", "saving",
           choices=("ckpt", "pt", "safetensors", "diffusers", "diffusers_safetensors"),
           per_script=((NETWORK, "safetensors"), (TI, "pt"), (HYPERNETWORK, "pt"))),
    Option("save_precision", str, None, "precision of saved weights (default: as trained)", "saving",
           choices=("float", "fp16", "bf16")),
    Option("use_safetensors", bool, False, "save as .safetensors when save_model_as is not given", "saving",
           scripts=DB_ONLY),
    Option("save_every_n_epochs", int, None, "also save every N epochs", "saving", minimum=1, off=GUI_UNSET),
    Option("save_every_n_steps", int, None, "also save every N steps", "saving", minimum=1, off=GUI_UNSET),
    Option("save_every_n_minutes", float, None, "also save (a step file, and its state with --save_state) once N "
           "minutes have passed since the last save: for machines that may be taken away (ours; not in sd-scripts)",
           "saving", above=0),
    Option("posthoc_ema", bool, False, "keep power-function EMAs of the trained weights and save snapshots of them, so "
           "tools/posthoc_ema.py can rebuild an EMA of any width afterwards (ours; Karras et al. 2024)", "saving",
           scripts=POSTHOC),
    Option("posthoc_ema_sigma_rels", str, "0.05,0.1", "widths (σ_rel) of the tracked EMAs", "saving",
           scripts=POSTHOC, numbers=Numbers(float, (2, 3)), above=0, below=0.2886),
    Option("posthoc_ema_every", int, None, "post-hoc EMA snapshot every N steps (default: 20 over the run, and at "
           "the end)", "saving", scripts=POSTHOC, minimum=1),
    Option("save_n_epoch_ratio", int, None,
           "save about N times over the run: every floor(epochs / N) epochs (at least 1), over save_every_n_epochs",
           "saving", minimum=1, off=GUI_UNSET),
    Option("save_last_n_epochs", int, None, "keep only the last N epoch saves", "saving", minimum=1, off=GUI_UNSET),
    Option("save_last_n_epochs_state", int, None, "keep only the last N epoch states (overrides save_last_n_epochs)",
           "saving", minimum=1, off=GUI_UNSET),
    Option("save_last_n_steps", int, None, "remove step saves older than N steps", "saving", minimum=1, off=GUI_UNSET),
    Option("save_last_n_steps_state", int, None, "remove step states older than N steps", "saving", minimum=1,
           off=GUI_UNSET),
    Option("save_state", bool, False, "save the training state (optimizer etc.) with every save", "saving"),
    Option("save_state_on_train_end", bool, False, "save the training state when the run ends", "saving"),
    Option("resume", str, None, "resume from this saved state folder, or from an output folder (its newest complete -state folder)",
           "saving", path=INPUT_PATH),
    Option("huggingface_repo_id", str, None, "upload outputs to this Hugging Face repo", "saving", note=HF_NOT_BUILT),
    Option("huggingface_repo_type", str, None, "type of the Hugging Face repo (model, dataset, ...)", "saving",
           note=NOT_SUPPORTED, inert_without=HF_UPLOAD),
    Option("huggingface_path_in_repo", str, None, "folder inside the Hugging Face repo", "saving", note=NOT_SUPPORTED,
           inert_without=HF_UPLOAD),
    Option("huggingface_token", str, None, "Hugging Face access token", "saving",
           note=SECRET_IN_FILES + "; log in with `huggingface-cli login` or set HF_TOKEN"),
    Option("huggingface_repo_visibility", str, None, "'public' to create a public repo (default private)", "saving",
           note=NOT_SUPPORTED, inert_without=HF_UPLOAD),
    Option("save_state_to_huggingface", bool, False, "upload saved states too", "saving", note=NOT_SUPPORTED,
           inert_without=HF_UPLOAD),
    Option("resume_from_huggingface", bool, False, "read --resume as repo_id/path:revision:repo_type on the Hub",
           "saving", note=HF_RESUME_NOT_BUILT, inert_without=("resume", None)),
    Option("async_upload", bool, False, "upload in the background", "saving", note=NOT_SUPPORTED,
           inert_without=HF_UPLOAD),
    Option("training_comment", str, None, "free text stored as ss_training_comment", "saving", scripts=NET),
    Option("no_metadata", bool, False, "save only the minimal ss_* metadata", "saving", scripts=NET),
    Option("metadata_title", str, None, "modelspec title (default: output_name)", "saving"),
    Option("metadata_author", str, None, "modelspec author", "saving"),
    Option("metadata_description", str, None, "modelspec description", "saving"),
    Option("metadata_license", str, None, "modelspec license", "saving"),
    Option("metadata_tags", str, None, "modelspec tags, comma-separated", "saving"),
    Option("metadata_usage_hint", str, None, "modelspec usage hint", "saving"),
    Option("metadata_thumbnail", str, None, "modelspec thumbnail: an image file or a data: URL", "saving"),
    Option("metadata_merged_from", str, None, "modelspec list of source models", "saving"),
    Option("metadata_trigger_phrase", str, None, "modelspec trigger phrase", "saving"),
    Option("metadata_preprocessor", str, None, "modelspec preprocessor", "saving"),
    Option("metadata_is_negative_embedding", str, None, "modelspec flag: the embedding is for negative prompts", "saving"),

    # --- sampling: preview images during training ---
    Option("sample_prompts", str, None, "prompt file (.txt, .toml or .json) for preview images", "sampling",
           path=INPUT_PATH),
    Option("sample_every_n_steps", int, None, "make preview images every N steps", "sampling", minimum=0),
    Option("sample_every_n_epochs", int, None, "make preview images every N epochs (overrides the steps)", "sampling",
           minimum=0),
    Option("sample_at_first", bool, False, "make preview images before training starts", "sampling"),
    Option("sample_sampler", str, "ddim", "sampler of the preview images", "sampling", choices=SAMPLERS),

    # --- logging: trackers and console (add_training_arguments, library/utils add_logging_arguments) ---
    Option("logging_dir", str, None, "write TensorBoard logs under this folder", "logging", path=OUTPUT_DIR),
    Option("log_with", str, None, "trackers to log to (default tensorboard when logging_dir is set)", "logging",
           choices=("tensorboard", "wandb", "all")),
    Option("log_prefix", str, None, "prefix of the run's log folder name", "logging"),
    Option("log_tracker_name", str, None, "tracker project name (default per script)", "logging"),
    Option("log_tracker_config", str, None,
           "TOML of each tracker's init arguments ([tensorboard], [wandb] tables); replaces --wandb_run_name",
           "logging", path=INPUT_PATH),
    Option("log_config", bool, False, "log the run's options to the trackers (secrets and paths left out)", "logging"),
    Option("wandb_run_name", str, None, "name of the wandb run", "logging",
           inert_without=("log_with", ("wandb", "all"))),
    Option("wandb_api_key", str, None, "wandb API key", "logging",
           note=SECRET_IN_FILES + "; set WANDB_API_KEY in the environment instead"),
    Option("console_log_level", str, None, "console log level (default INFO): WARNING shows warnings and errors only",
           "logging", choices=LOG_LEVELS),
    Option("console_log_file", str, None, "write the console log lines to this file instead (progress bars stay)",
           "logging"),
    Option("console_log_simple", bool, False, "accepted; console lines are always plain (no rich formatting)",
           "logging"),

    # --- dreambooth: train_db.py and fine_tune.py's text-encoder options ---
    Option("train_text_encoder", bool, False, "train the text encoder too (fine_tune.py's switch)", "dreambooth",
           scripts=DB_ONLY),
    Option("learning_rate_te", float, None, "learning rate of the text encoder (default: learning_rate)", "dreambooth",
           scripts=DB_ONLY, minimum=0),
    Option("stop_text_encoder_training", int, None, "freeze the text encoder from this step (-1 = never train it)",
           "dreambooth", scripts=DB_ONLY, minimum=-1),
    # sdxl_train.py's own (SDXL; train_db.py refuses them, naming their SD 1.x/2.x counterparts)
    Option("learning_rate_te1", float, None, "sdxl_train.py: learning rate of text encoder 1, CLIP ViT-L (default: "
           "learning_rate; 0 leaves it frozen)", "dreambooth", scripts=DB_ONLY, minimum=0),
    Option("learning_rate_te2", float, None, "sdxl_train.py: learning rate of text encoder 2, OpenCLIP bigG (default: "
           "learning_rate; 0 leaves it frozen)", "dreambooth", scripts=DB_ONLY, minimum=0),
    Option("block_lr", str, None, "sdxl_train.py: 23 comma-separated U-Net learning rates (time/label embeddings, "
           "input blocks 0-8, middle block 0-2, output blocks 0-8, out); they replace learning_rate for the U-Net, 0 "
           "leaves a block frozen", "dreambooth", scripts=DB_ONLY, numbers=Numbers(float, (23,)), minimum=0),
    Option("fused_optimizer_groups", int, None, "sdxl_train.py: step the optimizer inside backward in N groups of "
           "parameters (each group once all its gradients are there, clipped per group), freeing their gradients; "
           "any optimizer", "dreambooth", scripts=DB_ONLY, minimum=1),
    Option("diffusers_xformers", bool, False, "sdxl_train.py: xformers in the VAE (attention here is PyTorch SDPA "
           "either way; accepted, changes nothing)", "dreambooth", scripts=DB_ONLY),
    Option("no_token_padding", bool, False, "pad each batch's caption tokens only to its longest caption (diffusers' "
           "DreamBooth)", "dreambooth", scripts=DB_ONLY),
    # Class images (prior preservation), as the Dreambooth extension and diffusers' example make them; sd-scripts
    # has no generator. Each regularisation folder with fewer images is filled up with the base model.
    Option("num_class_images", int, None, "generate class images with the base model until each regularisation "
           "folder holds this many", "dreambooth", scripts=DB_ONLY, minimum=0),
    Option("class_prompt", str, None, "prompt of generated class images (default: the folder's class tokens)",
           "dreambooth", scripts=DB_ONLY),
    Option("class_negative_prompt", str, None, "negative prompt of generated class images", "dreambooth",
           scripts=DB_ONLY),
    Option("class_guidance_scale", float, 7.5, "guidance scale of generated class images", "dreambooth",
           scripts=DB_ONLY, minimum=0),
    Option("class_infer_steps", int, 40, "sampling steps of generated class images", "dreambooth",
           scripts=DB_ONLY, minimum=1),
    Option("class_sampler", str, "ddim", "sampler of generated class images", "dreambooth", choices=SAMPLERS,
           scripts=DB_ONLY),
    Option("class_seed", int, None, "seed of the first generated class image (default: --seed, else 0)",
           "dreambooth", scripts=DB_ONLY, minimum=0, maximum=MOST_SEED),
    Option("class_batch_size", int, 1, "class images generated per batch", "dreambooth", scripts=DB_ONLY, minimum=1),
    # An exponential moving average of the trained weights (full fine-tuning only).
    Option("use_ema", bool, False, "keep an exponential moving average (EMA) of the trained weights and save it",
           "dreambooth", scripts=DB_ONLY),
    Option("ema_decay", float, 0.9999, "EMA decay per update", "dreambooth", scripts=DB_ONLY, minimum=0, maximum=1),
    Option("ema_update_step_interval", int, 1, "update the EMA every N optimizer steps", "dreambooth",
           scripts=DB_ONLY, minimum=1),
    Option("ema_on_cpu", bool, False, "keep the EMA weights in CPU memory (no accelerator memory)", "dreambooth",
           scripts=DB_ONLY),
    Option("ema_save", str, "ema", "what a save writes with --use_ema: the EMA weights ('ema'), or also the raw "
           "weights as <name>-raw ('both')", "dreambooth", choices=("ema", "both"), scripts=DB_ONLY),

    # --- textual_inversion: train_textual_inversion.py, plus A1111-style schedule and templates ---
    Option("token_string", str, None, "the new token to learn; must not be in the tokenizer (with N vectors: "
           "tok, tok1 ... tok{N-1})", "textual_inversion", scripts=TI_ONLY),
    Option("init_word", str, None, "initialise the vectors from these words' token embeddings (cycled; default: "
           "the text encoder's own initialisation of new tokens)", "textual_inversion", scripts=TI_ONLY),
    Option("num_vectors_per_token", int, 1, "embedding vectors behind the token", "textual_inversion", scripts=TI_ONLY,
           minimum=1),
    Option("weights", str, None, "start from this embedding (A1111 .pt, sd-scripts or diffusers file; SDXL: a "
           "clip_l/clip_g file or learned_embeds(_2) folder) or hypernetwork .pt, keeping its step count", "textual_inversion", scripts=EMB, path=INPUT_PATH),
    Option("use_object_template", bool, False, "ignore captions; use built-in object prompts ('a photo of a {}')",
           "textual_inversion", scripts=TI_ONLY),
    Option("use_style_template", bool, False, "ignore captions; use built-in style prompts ('a painting in the style of "
           "{}')", "textual_inversion", scripts=TI_ONLY),
    Option("ti_lr_schedule", str, None, "A1111 learning-rate schedule, e.g. '0.005:100, 1e-3:1000, 1e-5' (rate until "
           "step); replaces --learning_rate/--lr_scheduler", "textual_inversion", scripts=EMB),
    Option("ti_template_file", str, None, "A1111 prompt template file ([name], [filewords]) in place of captions",
           "textual_inversion", scripts=EMB, path=INPUT_PATH),
    Option("ti_filename_word_regex", str, None, "[filewords] of an image without a caption: the file name's words "
           "matching this regex (A1111's dataset_filename_word_regex)", "textual_inversion", scripts=EMB),
    Option("ti_filename_join_string", str, " ", "string joining those words (A1111's dataset_filename_join_string)",
           "textual_inversion", scripts=EMB),

    # --- hypernetwork: our own, AUTOMATIC1111's format and options ---
    Option("hypernetwork_layer_structure", str, "1,2,1", "layer widths as multiples of the context size", "hypernetwork",
           scripts=HN_ONLY),
    Option("hypernetwork_activation_func", str, "linear", "activation between layers", "hypernetwork",
           choices=HYPERNETWORK_ACTIVATIONS, scripts=HN_ONLY),
    Option("hypernetwork_activate_output", bool, False, "also apply the activation after the last layer",
           "hypernetwork", scripts=HN_ONLY),
    Option("hypernetwork_layer_norm", bool, False, "add a LayerNorm after each layer", "hypernetwork", scripts=HN_ONLY),
    Option("hypernetwork_dropout_structure", str, None, "dropout per layer, e.g. '0,0.1,0' (default: none)",
           "hypernetwork", scripts=HN_ONLY),
    Option("hypernetwork_weight_init", str, "Normal", "initialisation of the layer weights", "hypernetwork",
           choices=HYPERNETWORK_WEIGHT_INITS, scripts=HN_ONLY),
    Option("hypernetwork_sizes", str, "320,640,768,1024,1280", "context sizes that get a hypernetwork module",
           "hypernetwork", scripts=HN_ONLY),
    Option("hypernetwork_multiplier", float, 1.0, "strength of the hypernetwork while training and sampling",
           "hypernetwork", scripts=HN_ONLY),

    # --- config: option files and run modes ---
    Option("config_file", str, None, "read options from this TOML (.toml added when missing); flags override it",
           "config", path=INPUT_PATH),
    Option("output_config", bool, False, "write the options to --config_file (or print them) and exit", "config"),
    Option("dry_run", bool, False, "check the options and the data, print the plan, load no weights", "config"),

    # --- advanced: attention, memory, compilation, multi-GPU (accepted; most matter only for speed or memory) ---
    Option("sdpa", bool, False, "accepted; PyTorch scaled-dot-product attention is always used", "advanced"),
    Option("xformers", bool, False, "accepted; not needed, PyTorch scaled-dot-product attention is always used",
           "advanced"),
    Option("mem_eff_attn", bool, False, "accepted; PyTorch scaled-dot-product attention is already memory-efficient",
           "advanced"),
    Option("lowram", bool, False, "accepted; no effect here (model placement is automatic)", "advanced"),
    Option("highvram", bool, False, "accepted; no effect here (device memory is managed automatically)", "advanced"),
    Option("torch_compile", bool, False, "compile the U-Net (with its adapters) with torch.compile", "advanced"),
    Option("dynamo_backend", str, "inductor", "torch.compile backend", "advanced", choices=DYNAMO_BACKENDS,
           off=("no", "NO"), inert_without=("torch_compile", None)),
    Option("cpu_offload_checkpointing", bool, False, "keep what the U-Net's forward saves for backward (with "
           "--gradient_checkpointing: its checkpoints) in CPU memory until backward", "advanced", scripts=NET),
    Option("ddp_timeout", int, None, "several processes: a collective's timeout in minutes (default: accelerate's)",
           "advanced", minimum=1),
    Option("ddp_gradient_as_bucket_view", bool, False,
           "DDP gradient_as_bucket_view (always on here: gradients are views into DDP's buckets)", "advanced"),
    Option("ddp_static_graph", bool, False, "DDP static_graph: the same parameters are used every step", "advanced"),
    Option("deepspeed", bool, False, "train full fine-tunes with DeepSpeed ZeRO (train_db.py, sdxl_train.py)",
           "advanced", note_per_script=tuple((script, ADAPTERS_USE_DDP) for script in (NETWORK, TI, HYPERNETWORK))),
    Option("zero_stage", int, 2, "DeepSpeed ZeRO stage", "advanced", choices=(0, 1, 2, 3),
           inert_without=DEEPSPEED),
    Option("offload_optimizer_device", str, None, "DeepSpeed: where to offload optimizer state (ZeRO 2/3)", "advanced",
           choices=("cpu", "nvme"), inert_without=DEEPSPEED),
    Option("offload_optimizer_nvme_path", str, None, "DeepSpeed: NVMe path for optimizer offload (ZeRO 3)", "advanced",
           inert_without=DEEPSPEED, path=INPUT_PATH),
    Option("offload_param_device", str, None, "DeepSpeed: where to offload parameters (ZeRO 3)", "advanced",
           choices=("cpu", "nvme"), inert_without=DEEPSPEED),
    Option("offload_param_nvme_path", str, None, "DeepSpeed: NVMe path for parameter offload (ZeRO 3)", "advanced",
           inert_without=DEEPSPEED, path=INPUT_PATH),
    Option("zero3_init_flag", bool, False, "DeepSpeed: build the model with deepspeed.zero.Init (ZeRO 3)", "advanced",
           inert_without=DEEPSPEED, note="is not supported: models load whole on each process and are partitioned "
           "when training starts"),
    Option("zero3_save_16bit_model", bool, False,
           "DeepSpeed ZeRO 3: gather the full weights for saves (always done here; the file keeps the models' dtype)",
           "advanced", inert_without=DEEPSPEED),
    Option("fp16_master_weights_and_gradients", bool, False, "DeepSpeed: fp16 master weights and gradients", "advanced",
           inert_without=DEEPSPEED, note="is not supported: DeepSpeed's fp16 mode is not wired in; use "
           "--mixed_precision bf16 (or no)"),
)
