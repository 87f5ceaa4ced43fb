"""Every command-line option of sd-scripts' SD 1.x/2.x trainers, and which of our entry scripts it maps to.

Compiled from kohya-ss/sd-scripts' source (not imported: sd-scripts is not a dependency). The parsers read:

- train_network.py  setup_parser: add_logging_arguments, add_sd_models_arguments, add_model_spec_arguments,
  add_dataset_arguments(parser, True, True, True), add_training_arguments(parser, True), add_masked_loss_arguments,
  add_deepspeed_arguments, add_optimizer_arguments, add_config_arguments, add_custom_train_arguments, then its own.
- train_db.py  setup_parser: the same, but add_dataset_arguments(parser, True, False, True) (no --in_json,
  --dataset_repeats), plus add_sd_saving_arguments, then its own.
- train_textual_inversion.py  setup_parser: the same as train_network.py but add_dataset_arguments(parser, True,
  True, False) (no caption dropout) and add_custom_train_arguments(parser, False) (no --weighted_captions).

Files and the stored versions read (SD_SCRIPTS_COMMIT is the one train_util.py and train_network.py were read at):
library/train_util.py and train_network.py @ 6edbe00547ba; train_db.py and train_textual_inversion.py @ 0010c81a3353;
library/config_util.py @ 025347214d76; library/custom_train_functions.py @ 0329bea5848f; library/deepspeed_utils.py
@ 2374f400707f; library/sai_model_spec.py @ 10bfcb9ac5b3; library/utils.py (add_logging_arguments) @ 0005867ba509.
SDXL/SD3/FLUX-only scripts and add_dit_training_arguments are left out.

Mapping: train_network.py -> NETWORK, train_db.py -> DB, train_textual_inversion.py -> TI. Options from sd-scripts'
shared library parsers (train_util, config_util, custom_train_functions, deepspeed_utils, sai_model_spec, utils)
also map to HYPERNETWORK, which takes the shared options; add_sd_saving_arguments (train_db only) and the scripts'
own setup_parser options do not.
"""

from __future__ import annotations

from library.config.options import DB, HYPERNETWORK, NETWORK, TI

SD_SCRIPTS_COMMIT = "6edbe00547bac6c2efb2d6952eb910851662cdf2"

_ALL = frozenset({NETWORK, DB, TI, HYPERNETWORK})
_THREE = frozenset({NETWORK, DB, TI})  # in each script's own setup_parser, not a shared parser
_NOT_TI = frozenset({NETWORK, DB, HYPERNETWORK})  # TI: add_dataset_arguments(..., support_caption_dropout=False) etc.
_NOT_DB = frozenset({NETWORK, TI, HYPERNETWORK})  # train_db: add_dataset_arguments(..., support_caption=False)
_NET = frozenset({NETWORK})
_DB = frozenset({DB})
_TI = frozenset({TI})

# option name (no dashes) -> our script ids; sorted by name; the comment names the sd-scripts function(s) adding it.
SD_SCRIPTS_OPTIONS: dict[str, frozenset[str]] = {
    "adaptive_noise_scale": _ALL,  # train_util.add_training_arguments
    "alpha_mask": _ALL,  # train_util.add_dataset_arguments
    "async_upload": _ALL,  # train_util.add_training_arguments
    "base_weights": _NET,  # train_network.setup_parser
    "base_weights_multiplier": _NET,  # train_network.setup_parser
    "bucket_no_upscale": _ALL,  # train_util.add_dataset_arguments
    "bucket_reso_steps": _ALL,  # train_util.add_dataset_arguments
    "cache_info": _ALL,  # train_util.add_dataset_arguments
    "cache_latents": _ALL,  # train_util.add_dataset_arguments
    "cache_latents_to_disk": _ALL,  # train_util.add_dataset_arguments
    "caption_dropout_every_n_epochs": _NOT_TI,  # train_util.add_dataset_arguments
    "caption_dropout_rate": _NOT_TI,  # train_util.add_dataset_arguments
    "caption_extension": _ALL,  # train_util.add_dataset_arguments
    "caption_extention": _ALL,  # train_util.add_dataset_arguments
    "caption_prefix": _ALL,  # train_util.add_dataset_arguments
    "caption_separator": _ALL,  # train_util.add_dataset_arguments
    "caption_suffix": _ALL,  # train_util.add_dataset_arguments
    "caption_tag_dropout_rate": _NOT_TI,  # train_util.add_dataset_arguments
    "clip_skip": _ALL,  # train_util.add_training_arguments
    "color_aug": _ALL,  # train_util.add_dataset_arguments
    "conditioning_data_dir": _ALL,  # train_util.add_masked_loss_arguments
    "config_file": _ALL,  # train_util.add_training_arguments
    "console_log_file": _ALL,  # utils.add_logging_arguments
    "console_log_level": _ALL,  # utils.add_logging_arguments
    "console_log_simple": _ALL,  # utils.add_logging_arguments
    "cpu_offload_checkpointing": _NET,  # train_network.setup_parser
    "dataset_class": _ALL,  # train_util.add_dataset_arguments
    "dataset_config": _ALL,  # config_util.add_config_arguments
    "dataset_repeats": _NOT_DB,  # train_util.add_dataset_arguments
    "ddp_gradient_as_bucket_view": _ALL,  # train_util.add_training_arguments
    "ddp_static_graph": _ALL,  # train_util.add_training_arguments
    "ddp_timeout": _ALL,  # train_util.add_training_arguments
    "debiased_estimation_loss": _ALL,  # custom_train_functions.add_custom_train_arguments
    "debug_dataset": _ALL,  # train_util.add_dataset_arguments
    "deepspeed": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "dim_from_weights": _NET,  # train_network.setup_parser
    "dynamo_backend": _ALL,  # train_util.add_training_arguments
    "enable_bucket": _ALL,  # train_util.add_dataset_arguments
    "enable_wildcard": _ALL,  # train_util.add_dataset_arguments
    "face_crop_aug_range": _ALL,  # train_util.add_dataset_arguments
    "flip_aug": _ALL,  # train_util.add_dataset_arguments
    "fp16_master_weights_and_gradients": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "fp8_base": _ALL,  # train_util.add_training_arguments
    "fp8_base_unet": _NET,  # train_network.setup_parser
    "full_bf16": _ALL,  # train_util.add_training_arguments
    "full_fp16": _ALL,  # train_util.add_training_arguments
    "fused_backward_pass": _ALL,  # train_util.add_optimizer_arguments
    "gradient_accumulation_steps": _ALL,  # train_util.add_training_arguments
    "gradient_checkpointing": _ALL,  # train_util.add_training_arguments
    "highvram": _ALL,  # train_util.add_training_arguments
    "huber_c": _ALL,  # train_util.add_training_arguments
    "huber_scale": _ALL,  # train_util.add_training_arguments
    "huber_schedule": _ALL,  # train_util.add_training_arguments
    "huggingface_path_in_repo": _ALL,  # train_util.add_training_arguments
    "huggingface_repo_id": _ALL,  # train_util.add_training_arguments
    "huggingface_repo_type": _ALL,  # train_util.add_training_arguments
    "huggingface_repo_visibility": _ALL,  # train_util.add_training_arguments
    "huggingface_token": _ALL,  # train_util.add_training_arguments
    "in_json": _NOT_DB,  # train_util.add_dataset_arguments
    "init_word": _TI,  # train_textual_inversion.setup_parser
    "initial_epoch": _NET,  # train_network.setup_parser
    "initial_step": _NET,  # train_network.setup_parser
    "ip_noise_gamma": _ALL,  # train_util.add_training_arguments
    "ip_noise_gamma_random_strength": _ALL,  # train_util.add_training_arguments
    "keep_tokens": _ALL,  # train_util.add_dataset_arguments
    "keep_tokens_separator": _ALL,  # train_util.add_dataset_arguments
    "learning_rate": _ALL,  # train_util.add_optimizer_arguments
    "learning_rate_te": _DB,  # train_db.setup_parser
    "log_config": _ALL,  # train_util.add_training_arguments
    "log_prefix": _ALL,  # train_util.add_training_arguments
    "log_tracker_config": _ALL,  # train_util.add_training_arguments
    "log_tracker_name": _ALL,  # train_util.add_training_arguments
    "log_with": _ALL,  # train_util.add_training_arguments
    "logging_dir": _ALL,  # train_util.add_training_arguments
    "loss_type": _ALL,  # train_util.add_training_arguments
    "lowram": _ALL,  # train_util.add_training_arguments
    "lr_decay_steps": _ALL,  # train_util.add_optimizer_arguments
    "lr_scheduler": _ALL,  # train_util.add_optimizer_arguments
    "lr_scheduler_args": _ALL,  # train_util.add_optimizer_arguments
    "lr_scheduler_min_lr_ratio": _ALL,  # train_util.add_optimizer_arguments
    "lr_scheduler_num_cycles": _ALL,  # train_util.add_optimizer_arguments
    "lr_scheduler_power": _ALL,  # train_util.add_optimizer_arguments
    "lr_scheduler_timescale": _ALL,  # train_util.add_optimizer_arguments
    "lr_scheduler_type": _ALL,  # train_util.add_optimizer_arguments
    "lr_warmup_steps": _ALL,  # train_util.add_optimizer_arguments
    "masked_loss": _ALL,  # train_util.add_masked_loss_arguments
    "max_bucket_reso": _ALL,  # train_util.add_dataset_arguments
    "max_data_loader_n_workers": _ALL,  # train_util.add_training_arguments
    "max_grad_norm": _ALL,  # train_util.add_optimizer_arguments
    "max_timestep": _ALL,  # train_util.add_training_arguments
    "max_token_length": _ALL,  # train_util.add_training_arguments
    "max_train_epochs": _ALL,  # train_util.add_training_arguments
    "max_train_steps": _ALL,  # train_util.add_training_arguments
    "max_validation_steps": _NET,  # train_network.setup_parser
    "mem_eff_attn": _ALL,  # train_util.add_training_arguments
    "metadata_author": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_description": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_is_negative_embedding": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_license": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_merged_from": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_preprocessor": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_tags": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_thumbnail": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_title": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_trigger_phrase": _ALL,  # sai_model_spec.add_model_spec_arguments
    "metadata_usage_hint": _ALL,  # sai_model_spec.add_model_spec_arguments
    "min_bucket_reso": _ALL,  # train_util.add_dataset_arguments
    "min_snr_gamma": _ALL,  # custom_train_functions.add_custom_train_arguments
    "min_timestep": _ALL,  # train_util.add_training_arguments
    "mixed_precision": _ALL,  # train_util.add_training_arguments
    "multires_noise_discount": _ALL,  # train_util.add_training_arguments
    "multires_noise_iterations": _ALL,  # train_util.add_training_arguments
    "network_alpha": _NET,  # train_network.setup_parser
    "network_args": _NET,  # train_network.setup_parser
    "network_dim": _NET,  # train_network.setup_parser
    "network_dropout": _NET,  # train_network.setup_parser
    "network_module": _NET,  # train_network.setup_parser
    "network_train_text_encoder_only": _NET,  # train_network.setup_parser
    "network_train_unet_only": _NET,  # train_network.setup_parser
    "network_weights": _NET,  # train_network.setup_parser
    "no_half_vae": _THREE,  # setup_parser of train_network, train_db and train_textual_inversion
    "no_metadata": _NET,  # train_network.setup_parser
    "no_token_padding": _DB,  # train_db.setup_parser
    "noise_offset": _ALL,  # train_util.add_training_arguments
    "noise_offset_random_strength": _ALL,  # train_util.add_training_arguments
    "num_vectors_per_token": _TI,  # train_textual_inversion.setup_parser
    "offload_optimizer_device": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "offload_optimizer_nvme_path": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "offload_param_device": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "offload_param_nvme_path": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "optimizer_args": _ALL,  # train_util.add_optimizer_arguments
    "optimizer_type": _ALL,  # train_util.add_optimizer_arguments
    "output_config": _ALL,  # train_util.add_training_arguments
    "output_dir": _ALL,  # train_util.add_training_arguments
    "output_name": _ALL,  # train_util.add_training_arguments
    "persistent_data_loader_workers": _ALL,  # train_util.add_training_arguments
    "pretrained_model_name_or_path": _ALL,  # train_util.add_sd_models_arguments
    "prior_loss_weight": _ALL,  # train_util.add_training_arguments
    "random_crop": _ALL,  # train_util.add_dataset_arguments
    "reg_data_dir": _ALL,  # train_util.add_dataset_arguments
    "resize_interpolation": _ALL,  # train_util.add_dataset_arguments
    "resolution": _ALL,  # train_util.add_dataset_arguments
    "resume": _ALL,  # train_util.add_training_arguments
    "resume_from_huggingface": _ALL,  # train_util.add_training_arguments
    "sample_at_first": _ALL,  # train_util.add_training_arguments
    "sample_every_n_epochs": _ALL,  # train_util.add_training_arguments
    "sample_every_n_steps": _ALL,  # train_util.add_training_arguments
    "sample_prompts": _ALL,  # train_util.add_training_arguments
    "sample_sampler": _ALL,  # train_util.add_training_arguments
    "save_every_n_epochs": _ALL,  # train_util.add_training_arguments
    "save_every_n_steps": _ALL,  # train_util.add_training_arguments
    "save_last_n_epochs": _ALL,  # train_util.add_training_arguments
    "save_last_n_epochs_state": _ALL,  # train_util.add_training_arguments
    "save_last_n_steps": _ALL,  # train_util.add_training_arguments
    "save_last_n_steps_state": _ALL,  # train_util.add_training_arguments
    "save_model_as": _THREE,  # add_sd_saving_arguments (db); setup_parser of train_network, train_textual_inversion
    "save_n_epoch_ratio": _ALL,  # train_util.add_training_arguments
    "save_precision": _ALL,  # train_util.add_training_arguments
    "save_state": _ALL,  # train_util.add_training_arguments
    "save_state_on_train_end": _ALL,  # train_util.add_training_arguments
    "save_state_to_huggingface": _ALL,  # train_util.add_training_arguments
    "scale_v_pred_loss_like_noise_pred": _ALL,  # custom_train_functions.add_custom_train_arguments
    "scale_weight_norms": _NET,  # train_network.setup_parser
    "sdpa": _ALL,  # train_util.add_training_arguments
    "secondary_separator": _ALL,  # train_util.add_dataset_arguments
    "seed": _ALL,  # train_util.add_training_arguments
    "shuffle_caption": _ALL,  # train_util.add_dataset_arguments
    "skip_cache_check": _ALL,  # train_util.add_dataset_arguments
    "skip_until_initial_step": _NET,  # train_network.setup_parser
    "stop_text_encoder_training": _DB,  # train_db.setup_parser
    "text_encoder_lr": _NET,  # train_network.setup_parser
    "token_string": _TI,  # train_textual_inversion.setup_parser
    "token_warmup_min": _ALL,  # train_util.add_dataset_arguments
    "token_warmup_step": _ALL,  # train_util.add_dataset_arguments
    "tokenizer_cache_dir": _ALL,  # train_util.add_sd_models_arguments
    "torch_compile": _ALL,  # train_util.add_training_arguments
    "train_batch_size": _ALL,  # train_util.add_training_arguments
    "train_data_dir": _ALL,  # train_util.add_dataset_arguments
    "training_comment": _NET,  # train_network.setup_parser
    "unet_lr": _NET,  # train_network.setup_parser
    "use_8bit_adam": _ALL,  # train_util.add_optimizer_arguments
    "use_lion_optimizer": _ALL,  # train_util.add_optimizer_arguments
    "use_object_template": _TI,  # train_textual_inversion.setup_parser
    "use_safetensors": _DB,  # train_util.add_sd_saving_arguments
    "use_style_template": _TI,  # train_textual_inversion.setup_parser
    "v2": _ALL,  # train_util.add_sd_models_arguments
    "v_parameterization": _ALL,  # train_util.add_sd_models_arguments
    "v_pred_like_loss": _ALL,  # custom_train_functions.add_custom_train_arguments
    "vae": _ALL,  # train_util.add_training_arguments
    "vae_batch_size": _ALL,  # train_util.add_dataset_arguments
    "validate_every_n_epochs": _NET,  # train_network.setup_parser
    "validate_every_n_steps": _NET,  # train_network.setup_parser
    "validation_seed": _NET,  # train_network.setup_parser
    "validation_split": _NET,  # train_network.setup_parser
    "wandb_api_key": _ALL,  # train_util.add_training_arguments
    "wandb_run_name": _ALL,  # train_util.add_training_arguments
    "weighted_captions": _NOT_TI,  # custom_train_functions.add_custom_train_arguments
    "weights": _TI,  # train_textual_inversion.setup_parser
    "xformers": _ALL,  # train_util.add_training_arguments
    "zero3_init_flag": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "zero3_save_16bit_model": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "zero_stage": _ALL,  # deepspeed_utils.add_deepspeed_arguments
    "zero_terminal_snr": _ALL,  # train_util.add_training_arguments
}
