"""Keys the kohya_ss GUI and lora-scripts write into config TOMLs that are not sd-scripts options.

sd-scripts never checks a --config_file's keys (it copies them all into its argparse Namespace), so these load there
and do nothing. We ignore them too, naming them in one note, instead of refusing them as unknown options. A key that
another tool reads as one of our options under another name (`means`) is ignored only while that makes no difference;
a key of a feature of another trainer (`switch`) is ignored only while that feature's switch is off.

Sources (read at these paths; the GUIs' own code decides what they write):
- kohya_ss: bmaltais/kohya_ss kohya_gui/lora_gui.py, dreambooth_gui.py, finetune_gui.py, textual_inversion_gui.py
  (`config_toml_data`, the TOML handed to sd-scripts), their save_configuration() parameters (the GUI's saved
  settings), kohya_gui/common_gui.py update_my_data(), and "config example.toml" (the GUI's defaults file).
- lora-scripts: Akegarasu/lora-scripts mikazuki/app/api.py create_toml_file() and get_sample_prompts() (keys its
  web UI sends and the exported/autosaved TOML keeps), and its toml/*.toml and config/*.toml templates.
"""

from __future__ import annotations

from dataclasses import dataclass

KOHYA_RUN = "kohya_ss GUI"  # written into the TOML it passes to sd-scripts (config_toml_data)
KOHYA_SETTINGS = "kohya_ss GUI settings"  # its own saved settings / defaults file, not sd-scripts options
LORA_SCRIPTS = "lora-scripts"


@dataclass(frozen=True)
class GuiKey:
    name: str
    source: str
    means: str | None = None  # the option this key stands for in that tool (ignored while it changes nothing)
    switch: str | None = None  # the key that turns this key's feature on (a feature we do not have)
    feature: str | None = None  # that feature, in words


def _keys(source: str, names: str, **kw) -> list[GuiKey]:
    return [GuiKey(name, source, **kw) for name in names.split()]


GUI_KEYS: dict[str, GuiKey] = {key.name: key for key in [
    # kohya_ss lora_gui.py & co. write these beside the sd-scripts options; sd-scripts has no such argument.
    # `epoch` is the GUI's field it turns into max_train_steps itself; noise_offset_type picks which noise options
    # it writes; lowvram is a GUI switch.
    *_keys(KOHYA_RUN, "epoch noise_offset_type lowvram"),
    # kohya_ss GUI settings (save_configuration() parameters, "config example.toml"): folders, launcher and widget
    # state. The GUI turns them into options itself (LoRA_type/conv_dim/... into network_args, xformers into
    # --xformers/--sdpa, max_resolution into resolution, ...).
    *_keys(KOHYA_SETTINGS, "LoRA_type LyCORIS_preset additional_parameters block_alphas block_dims "
                           "block_lr_zero_threshold config_dir constrain conv_alpha conv_block_alphas conv_block_dims "
                           "conv_dim decompose_both down_lr_weight factor images_folder instance_prompt "
                           "log_tracker_config_dir lr_warmup max_resolution mid_lr_weight model_list models_dir "
                           "module_dropout multi_gpu num_cpu_threads_per_process num_machines num_processes "
                           "rank_dropout rank_dropout_scale reg_images_folder rescaled sdxl "
                           "sdxl_cache_text_encoder_outputs state_dir stop_text_encoder_training_pct train_norm "
                           "train_on_input training_preset unit up_lr_weight use_cp use_scalar use_tucker use_wandb "
                           "vae_dir"),
    *_keys(KOHYA_SETTINGS, "optimizer", means="optimizer_type"),
    *_keys(KOHYA_SETTINGS, "lora_network_weights", means="network_weights"),
    *_keys(KOHYA_SETTINGS, "sdxl_no_half_vae", means="no_half_vae"),
    # both GUIs: which GPUs the launcher uses (accelerate's --gpu_ids, not a trainer option)
    *_keys(f"{KOHYA_SETTINGS} and {LORA_SCRIPTS}", "gpu_ids"),
    # lora-scripts' web UI: the trainer to launch, and preview prompts it turns into a sample_prompts file
    *_keys(LORA_SCRIPTS, "model_train_type prompt_file positive_prompts negative_prompts sample_width sample_height "
                         "sample_cfg sample_steps sample_seed randomly_choice_prompt random_prompt_include_subdirs "
                         "enable_preview"),
    # lora-scripts' old train.sh variables, kept in its toml/ templates (sd-scripts reads neither)
    *_keys(LORA_SCRIPTS, "lr_restart_cycles", means="lr_scheduler_num_cycles"),
    *_keys(LORA_SCRIPTS, "batch_size", means="train_batch_size"),
    # lora-scripts config/lora.toml: contrastive training of its own trainer (off there)
    *_keys(LORA_SCRIPTS, "enable_contrastive negative_sampling_method noise_strength contrastive_weight "
                         "contrastive_warmup_steps", switch="enable_contrastive",
             feature="lora-scripts' contrastive training"),
]}
