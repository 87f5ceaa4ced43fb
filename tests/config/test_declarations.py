"""The option declarations: well-formed, and sd-scripts' names, defaults, choices and nargs kept exactly."""

from __future__ import annotations

import pytest

from library.config.declarations import OPTIONS
from library.config.options import ALL_SCRIPTS, DB, HYPERNETWORK, NETWORK, TI, IntOrFloat

BY_NAME = {o.name: o for o in OPTIONS}
SECTIONS = {"model", "dataset", "captions", "caching", "training", "optimizer", "network", "saving", "sampling",
            "logging", "dreambooth", "textual_inversion", "hypernetwork", "config", "advanced"}
LATER = {None, 4, 5, 6, 7}

# sd-scripts' argparse defaults (library/train_util.py, config_util.py, custom_train_functions.py, deepspeed_utils.py,
# sai_model_spec.py, utils.py, train_network.py, train_db.py, train_textual_inversion.py, fine_tune.py).
SD_SCRIPTS_DEFAULTS = [
    # add_sd_models_arguments
    ("v2", False), ("v_parameterization", False), ("pretrained_model_name_or_path", None), ("tokenizer_cache_dir", None),
    # add_optimizer_arguments
    ("optimizer_type", ""), ("use_8bit_adam", False), ("use_lion_optimizer", False), ("learning_rate", 2.0e-6),
    ("max_grad_norm", 1.0), ("optimizer_args", None), ("lr_scheduler_type", ""), ("lr_scheduler_args", None),
    ("lr_scheduler", "constant"), ("lr_warmup_steps", 0), ("lr_decay_steps", 0), ("lr_scheduler_num_cycles", 1),
    ("lr_scheduler_power", 1), ("fused_backward_pass", False), ("lr_scheduler_timescale", None),
    ("lr_scheduler_min_lr_ratio", None),
    # add_training_arguments
    ("output_dir", None), ("output_name", None), ("huggingface_repo_id", None), ("save_precision", None),
    ("save_every_n_epochs", None), ("save_every_n_steps", None), ("save_n_epoch_ratio", None),
    ("save_last_n_epochs", None), ("save_last_n_steps_state", None), ("save_state", False), ("resume", None),
    ("train_batch_size", 1), ("max_token_length", None), ("mem_eff_attn", False), ("torch_compile", False),
    ("dynamo_backend", "inductor"), ("xformers", False), ("sdpa", False), ("vae", None), ("max_train_steps", 1600),
    ("max_train_epochs", None), ("max_data_loader_n_workers", 8), ("persistent_data_loader_workers", False),
    ("seed", None), ("gradient_checkpointing", False), ("gradient_accumulation_steps", 1), ("mixed_precision", "no"),
    ("full_fp16", False), ("full_bf16", False), ("fp8_base", False), ("ddp_timeout", None), ("clip_skip", None),
    ("logging_dir", None), ("log_with", None), ("log_prefix", None), ("log_tracker_name", None),
    ("wandb_api_key", None), ("log_config", False), ("noise_offset", None), ("multires_noise_iterations", None),
    ("multires_noise_discount", 0.3), ("ip_noise_gamma", None), ("adaptive_noise_scale", None),
    ("zero_terminal_snr", False), ("min_timestep", None), ("max_timestep", None), ("loss_type", "l2"),
    ("huber_schedule", "snr"), ("huber_c", 0.1), ("huber_scale", 1.0), ("lowram", False), ("highvram", False),
    ("sample_every_n_steps", None), ("sample_every_n_epochs", None), ("sample_at_first", False),
    ("sample_prompts", None), ("sample_sampler", "ddim"), ("config_file", None), ("output_config", False),
    ("prior_loss_weight", 1.0),
    # add_masked_loss_arguments
    ("conditioning_data_dir", None), ("masked_loss", False),
    # add_dataset_arguments
    ("train_data_dir", None), ("cache_info", False), ("shuffle_caption", False), ("caption_separator", ","),
    ("caption_extension", ".caption"), ("caption_extention", None), ("keep_tokens", 0), ("keep_tokens_separator", ""),
    ("secondary_separator", None), ("enable_wildcard", False), ("caption_prefix", None), ("caption_suffix", None),
    ("color_aug", False), ("flip_aug", False), ("face_crop_aug_range", None), ("random_crop", False),
    ("debug_dataset", False), ("resolution", None), ("cache_latents", False), ("vae_batch_size", 1),
    ("cache_latents_to_disk", False), ("skip_cache_check", False), ("enable_bucket", False), ("min_bucket_reso", 256),
    ("max_bucket_reso", 1024), ("bucket_reso_steps", 64), ("bucket_no_upscale", False), ("resize_interpolation", None),
    ("token_warmup_min", 1), ("token_warmup_step", 0), ("alpha_mask", False), ("dataset_class", None),
    ("caption_dropout_rate", 0.0), ("caption_dropout_every_n_epochs", 0), ("caption_tag_dropout_rate", 0.0),
    ("reg_data_dir", None), ("in_json", None), ("dataset_repeats", 1),
    # add_sd_saving_arguments, add_config_arguments, add_custom_train_arguments, add_logging_arguments
    ("use_safetensors", False), ("dataset_config", None), ("min_snr_gamma", None),
    ("scale_v_pred_loss_like_noise_pred", False), ("v_pred_like_loss", None), ("debiased_estimation_loss", False),
    ("weighted_captions", False), ("console_log_level", None), ("console_log_file", None), ("console_log_simple", False),
    # add_deepspeed_arguments, add_model_spec_arguments
    ("deepspeed", False), ("zero_stage", 2), ("offload_optimizer_device", None), ("zero3_init_flag", False),
    ("metadata_title", None), ("metadata_tags", None), ("metadata_is_negative_embedding", None),
    # train_network.py
    ("network_dim", None), ("network_alpha", 1), ("network_module", None), ("network_weights", None),
    ("network_dropout", None), ("network_args", None), ("network_train_unet_only", False), ("unet_lr", None),
    ("text_encoder_lr", None), ("training_comment", None), ("dim_from_weights", False), ("scale_weight_norms", None),
    ("base_weights", None), ("base_weights_multiplier", None), ("no_half_vae", False), ("no_metadata", False),
    ("fp8_base_unet", False), ("cpu_offload_checkpointing", False), ("initial_epoch", None), ("initial_step", None),
    ("validation_seed", None), ("validation_split", 0.0), ("validate_every_n_steps", None),
    ("max_validation_steps", None),
    # train_db.py, fine_tune.py, train_textual_inversion.py
    ("learning_rate_te", None), ("stop_text_encoder_training", None), ("no_token_padding", False),
    ("train_text_encoder", False), ("num_vectors_per_token", 1), ("token_string", None), ("init_word", None),
    ("weights", None), ("use_object_template", False), ("use_style_template", False),
]

SD_SCRIPTS_CHOICES = [
    ("save_precision", {"float", "fp16", "bf16"}),
    ("mixed_precision", {"no", "fp16", "bf16"}),
    ("max_token_length", {150, 225}),
    ("loss_type", {"l1", "l2", "huber", "smooth_l1"}),
    ("huber_schedule", {"constant", "exponential", "snr"}),
    ("log_with", {"tensorboard", "wandb", "all"}),
    ("resize_interpolation", {"lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"}),
    ("zero_stage", {0, 1, 2, 3}),
    ("offload_optimizer_device", {"cpu", "nvme"}),
    ("console_log_level", {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}),
    # union of train_db's {ckpt, safetensors, diffusers, diffusers_safetensors} and network/TI's {ckpt, pt, safetensors}
    ("save_model_as", {"ckpt", "pt", "safetensors", "diffusers", "diffusers_safetensors"}),
]

SD_SCRIPTS_NARGS = {"optimizer_args": ("*", str), "lr_scheduler_args": ("*", str), "network_args": ("*", str),
                    "text_encoder_lr": ("*", float), "base_weights": ("*", str),
                    "base_weights_multiplier": ("*", float)}


def test_names_are_unique():
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_option_is_well_formed(opt):
    assert opt.help.strip() and "\n" not in opt.help
    assert opt.section in SECTIONS
    assert opt.later in LATER
    assert opt.scripts and opt.scripts <= ALL_SCRIPTS
    assert opt.type in (bool, int, float, str, IntOrFloat)
    assert opt.nargs in (None, "*", "+")
    if opt.type is bool:
        assert opt.default is False and opt.choices is None and opt.nargs is None
    if opt.choices is not None:
        assert opt.default is None or opt.default in opt.choices
        assert all(_has_type(c, opt.type) for c in opt.choices)


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_default_has_the_declared_type(opt):
    if opt.default is None:
        return
    values = opt.default if opt.nargs else [opt.default]
    if opt.nargs:
        assert isinstance(opt.default, list)
    assert all(_has_type(v, opt.type) for v in values), (opt.name, opt.default)


def _has_type(value, kind) -> bool:
    if kind is IntOrFloat:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, float)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@pytest.mark.parametrize("name,default", SD_SCRIPTS_DEFAULTS, ids=[n for n, _ in SD_SCRIPTS_DEFAULTS])
def test_default_matches_sd_scripts(name, default):
    assert name in BY_NAME, f"sd-scripts option --{name} is not declared"
    declared = BY_NAME[name].default
    if isinstance(default, bool) or isinstance(declared, bool) or default is None:
        assert declared is default  # False must not pass for 0, nor 0 for None
    else:
        assert declared == default


@pytest.mark.parametrize("name,choices", SD_SCRIPTS_CHOICES, ids=[n for n, _ in SD_SCRIPTS_CHOICES])
def test_choices_match_sd_scripts(name, choices):
    assert set(BY_NAME[name].choices) == choices


# List options of ours (not in sd-scripts): --train_embeddings mychar:4 "style:2:oil painting" (pivotal tuning).
OUR_NARGS = {"train_embeddings": ("+", str)}


def test_list_options_keep_sd_scripts_nargs_and_element_type():
    listed = {o.name: (o.nargs, o.type) for o in OPTIONS if o.nargs}
    assert listed == SD_SCRIPTS_NARGS | OUR_NARGS


def test_int_or_float_options():
    assert {o.name for o in OPTIONS if o.type is IntOrFloat} == {"lr_warmup_steps", "lr_decay_steps"}


def test_samplers_and_dynamo_backends_are_sd_scripts_lists():
    assert len(BY_NAME["sample_sampler"].choices) == 16 and "dpmsolver++" in BY_NAME["sample_sampler"].choices
    assert {"inductor", "eager", "cudagraphs", "tvm"} <= set(BY_NAME["dynamo_backend"].choices)


def test_scripts_follow_sd_scripts_split():
    only = {name: BY_NAME[name].scripts for name in BY_NAME}
    assert only["network_dim"] == {NETWORK} and only["validation_split"] == {NETWORK}
    assert only["stop_text_encoder_training"] == {DB} and only["train_text_encoder"] == {DB}
    assert only["token_string"] == {TI} and only["init_word"] == {TI}
    # A1111 trains embeddings and hypernetworks with the same schedule strings, templates and starting file
    assert only["ti_lr_schedule"] == only["ti_template_file"] == only["weights"] == {TI, HYPERNETWORK}
    assert only["hypernetwork_layer_structure"] == {HYPERNETWORK}
    # sd-scripts' TI takes neither caption dropout nor weighted captions
    assert TI not in only["caption_dropout_rate"] and TI not in only["weighted_captions"]
    # train_db reads fine_tune.py's metadata option; the shared train_util options reach every script
    assert DB in only["in_json"] and only["keep_tokens"] == ALL_SCRIPTS and only["learning_rate"] == ALL_SCRIPTS


def test_implemented_now():
    now = {"pretrained_model_name_or_path", "v2", "v_parameterization", "vae", "tokenizer_cache_dir", "output_dir",
           "output_name", "save_precision", "save_model_as", "config_file", "output_config", "dry_run", "strict",
           "train_data_dir", "reg_data_dir", "in_json", "dataset_config", "dataset_repeats", "resolution",
           "train_batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
           "bucket_no_upscale", "caption_extension", "shuffle_caption", "caption_separator", "keep_tokens",
           "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
           "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min",
           "token_warmup_step", "color_aug", "flip_aug", "face_crop_aug_range", "random_crop", "alpha_mask",
           "resize_interpolation", "cache_latents", "cache_latents_to_disk", "vae_batch_size", "skip_cache_check",
           "cache_text_encoder_outputs", "cache_info", "max_train_steps", "max_train_epochs", "seed",
           "max_data_loader_n_workers", "persistent_data_loader_workers", "validation_split", "validation_seed"}
    accepted = {o.name for o in OPTIONS if o.later is None and o.note is None}
    assert now <= accepted


def test_later_issues_by_kind():
    # the training loop (#5) implements these now
    for name in ("network_module", "no_metadata", "optimizer_type", "prior_loss_weight", "training_comment"):
        assert BY_NAME[name].later is None and BY_NAME[name].note is None, name
    # accepted so configs load, refused by name: no issue covers them yet
    for name in ("huggingface_repo_id", "resume_from_huggingface"):  # refused with the reason and a workaround
        assert BY_NAME[name].note.startswith("is not supported: "), name
    for name in ("weighted_captions", "masked_loss", "conditioning_data_dir", "no_token_padding", "torch_compile",
                 "dynamo_backend", "fp8_base_unet", "initial_step", "validate_every_n_steps", "cpu_offload_checkpointing"):
        assert BY_NAME[name].note is None, name
    # DeepSpeed (#19) trains full fine-tunes; the adapter trainers refuse it with their reason
    assert BY_NAME["deepspeed"].note is None and BY_NAME["deepspeed"].for_script(DB).note is None
    assert "full fine-tuning" in BY_NAME["deepspeed"].for_script(NETWORK).note
    # train_db.py (#6) implements these now
    for name in ("learning_rate_te", "stop_text_encoder_training", "num_class_images", "use_ema"):
        assert BY_NAME[name].later is None and BY_NAME[name].note is None, name
    # train_textual_inversion.py and train_hypernetwork.py (#7) implement theirs now
    for name in ("init_word", "token_string", "ti_lr_schedule", "hypernetwork_sizes", "hypernetwork_weight_init"):
        assert BY_NAME[name].later is None and BY_NAME[name].note is None, name


def test_secrets_and_unsupported_hooks_carry_a_message():
    for name in ("dataset_class", "wandb_api_key", "huggingface_token"):
        assert BY_NAME[name].note, name
    assert BY_NAME["caption_extention"].note is None  # sd-scripts still reads the old spelling: so do we (warned)


def test_hypernetwork_defaults_are_a1111s():
    assert BY_NAME["hypernetwork_layer_structure"].default == "1,2,1"
    assert BY_NAME["hypernetwork_activation_func"].default == "linear"
    assert {"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"} <= set(
        BY_NAME["hypernetwork_activation_func"].choices)
    assert BY_NAME["hypernetwork_weight_init"].choices == (
        "Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
    assert BY_NAME["hypernetwork_sizes"].default == "320,640,768,1024,1280"
    assert BY_NAME["hypernetwork_multiplier"].default == 1.0
