"""Every example in configs/ runs: each --config_file TOML trains 2 steps on the tiny model through its entry
script (command-line flags point it at tiny-sd1, or tiny-sdxl for the SDXL one, a demo dataset and tmp folders), every key is a declared option
of its script, configs/dataset.toml resolves to a training and a regularisation subset, and the accelerate YAMLs
load with accelerate's own loader."""

from __future__ import annotations

import re

import pytest
import toml
import torch
from safetensors.torch import load_file

import sdxl_train
import sdxl_train_network
import sdxl_train_textual_inversion
import train_db
import train_hypernetwork
import train_network
import train_textual_inversion
from library.config.declarations import OPTIONS
from library.config.options import DB, HYPERNETWORK, NETWORK, TI
from library.config.resolve import options_for
from library.data.demo import make_demo_dataset
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = ROOT / "configs"
# example -> (entry script, its option set, extension of its final file)
EXAMPLES = {
    "lora": (train_network, NETWORK, "safetensors"),
    "locon": (train_network, NETWORK, "safetensors"),
    "loha": (train_network, NETWORK, "safetensors"),
    "lokr": (train_network, NETWORK, "safetensors"),
    "sdxl_lora": (sdxl_train_network, NETWORK, "safetensors"),
    "sdxl_db": (sdxl_train, DB, "safetensors"),
    "sdxl_ti": (sdxl_train_textual_inversion, TI, "safetensors"),
    "dreambooth": (train_db, DB, "safetensors"),
    "textual_inversion": (train_textual_inversion, TI, "pt"),
    "hypernetwork": (train_hypernetwork, HYPERNETWORK, "pt"),
}
NETWORK_MODULES = {"lora": "networks.lora", "locon": "networks.lora", "loha": "networks.loha", "lokr": "networks.lokr"}
# example -> (the base model file it names, the built-in tiny model of that family); the others: SD 1.5, tiny-sd1
MODELS = {"sdxl_lora": ("sd_xl_base_1.0.safetensors", "tiny-sdxl"),
          "sdxl_db": ("sd_xl_base_1.0.safetensors", "tiny-sdxl"),
          "sdxl_ti": ("sd_xl_base_1.0.safetensors", "tiny-sdxl")}
SD15 = ("v1-5-pruned-emaonly.safetensors", "tiny-sd1")
# What the tiny model cannot take from the SD 1.5 settings, for every example: a CPU run (no fp16 autocast, no
# bitsandbytes 8-bit optimizer), 32 px images (the buckets' 256..1024 px range), no loader processes, tmp folders.
TINY = ["--pretrained_model_name_or_path", "tiny-sd1", "--resolution", "32", "--max_train_steps", "2",
        "--train_batch_size", "1", "--optimizer_type", "AdamW", "--mixed_precision", "no",
        "--min_bucket_reso", "32", "--max_bucket_reso", "64", "--bucket_reso_steps", "32",
        "--max_data_loader_n_workers", "0"]


def _flat(name: str) -> dict:
    """The example's options, flattened over its [sections] as --config_file reads them."""
    data = toml.load(CONFIGS / f"{name}.toml")
    return {k: v for table in data.values() for k, v in table.items()}


# --------------------------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_every_key_is_an_option_of_its_script(name):
    data = toml.load(CONFIGS / f"{name}.toml")
    assert all(isinstance(table, dict) for table in data.values()), "keys belong under [sections]"
    declared = options_for(EXAMPLES[name][1], OPTIONS)
    keys = [key for table in data.values() for key in table]
    assert len(keys) == len(set(keys)), "a key is set twice"
    assert [key for key in keys if key not in declared] == []
    refused = [key for key in keys if declared[key].note or declared[key].later]
    assert refused == [], "options that are parsed but refused when set"
    flat = _flat(name)
    assert flat["pretrained_model_name_or_path"].endswith(MODELS.get(name, SD15)[0])
    if name in NETWORK_MODULES:
        assert flat["network_module"] == NETWORK_MODULES[name]
        assert ("conv_dim" in " ".join(flat.get("network_args", []))) == (name != "lora")


def test_dataset_toml_has_a_training_and_a_regularisation_subset():
    from library.config.dataset_config import load_dataset_config

    (dataset,) = load_dataset_config(CONFIGS / "dataset.toml", {})
    train, reg = dataset.subsets
    assert (train.is_reg, reg.is_reg) == (False, True)
    assert train.class_tokens and reg.class_tokens and train.num_repeats > 1
    assert dataset.enable_bucket and train.shuffle_caption and train.keep_tokens == 1
    assert train.caption_extension == ".txt" and dataset.resolution == (512, 512)
    assert _flat("dreambooth")["dataset_config"] == "configs/dataset.toml"


@pytest.mark.parametrize("name, kind, processes", [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 2)])
def test_accelerate_configs_load_with_accelerates_loader(name, kind, processes):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    path = CONFIGS / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))  # raises on keys accelerate does not know
    assert isinstance(config, ClusterConfig) and config == ClusterConfig.from_yaml_file(str(path))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.distributed_type == DistributedType[kind] and config.num_processes == processes
    assert config.mixed_precision == "fp16" and config.gpu_ids == "all" and config.num_machines == 1


def test_the_readme_names_every_example_and_its_command():
    readme = (CONFIGS / "README.md").read_text()
    files = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*")
                   if p.is_file() and p.name != "README.md")
    assert [f for f in files if f not in readme] == []
    for name, (script, _, _) in EXAMPLES.items():
        command = f"{script.__name__}.py --config_file configs/{name}.toml"
        assert command in readme, command


# --------------------------------------------------------------------------------------------- real runs
@pytest.fixture
def tiny_run(tmp_path):
    """Shared command-line overrides: tmp output and log folders, a 64 px two-step preview prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape, red circle --n blurry --w 64 --h 64 --d 1 --s 2\n")
    return ["--output_dir", str(tmp_path / "out"), "--logging_dir", str(tmp_path / "logs"),
            "--sample_prompts", str(prompts)]


@pytest.fixture
def folders(tmp_path):
    """--train_data_dir for the examples that name image folders: 2 demo images, 1 repeat (1 epoch = 2 steps)."""
    make_demo_dataset(tmp_path / "data", count=2, size=32, folder="1_sks shape")
    return ["--train_data_dir", str(tmp_path / "data")]


def _dataset_copy(tmp_path) -> str:
    """configs/dataset.toml with its image_dir values on demo folders and its sizes for the tiny model."""
    data = toml.load(CONFIGS / "dataset.toml")
    make_demo_dataset(tmp_path / "ds_train", count=1, size=32, folder="sks")
    make_demo_dataset(tmp_path / "ds_reg", count=1, size=32, seed=1, folder="shape")
    sizes = {"resolution": 32, "batch_size": 1, "min_bucket_reso": 32, "max_bucket_reso": 64, "bucket_reso_steps": 32}
    for table in [data["general"], *data["datasets"]]:
        table.update({k: v for k, v in sizes.items() if k in table})
        for subset in table.get("subsets", []):
            subset["image_dir"] = str(tmp_path / ("ds_reg/shape" if subset.get("is_reg") else "ds_train/sks"))
            subset["num_repeats"] = 1
    assert sum(1 for d in data["datasets"] for s in d["subsets"] if s.get("is_reg")) == 1
    path = tmp_path / "dataset.toml"
    path.write_text(toml.dumps(data))
    return str(path)


def _run(name: str, *extra: str):
    script, _, ext = EXAMPLES[name]
    flat = _flat(name)
    # An example that counts epochs overrides max_train_steps; one demo epoch is the 2 steps.
    epochs = ["--max_train_epochs", "1"] if "max_train_epochs" in flat else []
    tiny = [MODELS.get(name, SD15)[1] if arg == "tiny-sd1" else arg for arg in TINY]
    result = script.main(["--config_file", str(CONFIGS / f"{name}.toml"), *tiny, *epochs, *extra])
    assert result is not None and result.global_step == 2
    assert result.final_file.is_file() and result.final_file.suffix == f".{ext}"
    assert result.final_file.name == f"{flat['output_name']}.{ext}"
    return result, flat


@pytest.mark.parametrize("name", list(NETWORK_MODULES))
def test_network_example_trains(name, tiny_run, folders, tmp_path):
    result, flat = _run(name, *tiny_run, *folders)
    weights = load_file(str(result.final_file))
    assert weights and all(key.startswith("lora_") for key in weights)
    assert {v.dtype for v in weights.values()} == {torch.float16}  # save_precision = "fp16"
    assert any(key.startswith("lora_te_") for key in weights)  # the text encoder trains too
    if name != "lora":  # LoCon/LoHa/LoKr adapt the 3x3 convolutions (conv_dim)
        assert any(re.search(r"resnets_\d+_conv\d", key) for key in weights)
    # sample_every_n_epochs = 1: the epoch's preview, from the tmp prompt file
    assert list((tmp_path / "out" / "sample").glob(f"{flat['output_name']}_e000001_*.png"))


def test_sdxl_lora_example_trains_the_unet_with_sd_scripts_sdxl_names(tiny_run, folders, tmp_path):
    flat = _flat("sdxl_lora")
    # sd-scripts' SDXL LoRA recipe, as the example promises it
    assert flat["network_train_unet_only"] and flat["cache_latents"] and flat["cache_text_encoder_outputs"]
    assert flat["gradient_checkpointing"] and flat["no_half_vae"] and flat["mixed_precision"] == "bf16"
    assert flat["resolution"] == "1024,1024" and flat["bucket_reso_steps"] % 32 == 0 and 8 <= flat["network_dim"] <= 32
    assert flat["optimizer_type"] in ("AdamW8bit", "Adafactor") and "shuffle_caption" not in flat
    result, flat = _run("sdxl_lora", *tiny_run, *folders)
    weights = load_file(str(result.final_file))
    assert weights and all(key.startswith("lora_unet_") for key in weights)  # network_train_unet_only
    assert any(key.startswith("lora_unet_input_blocks_") for key in weights)  # SGM names, as sd-scripts' SDXL
    assert {v.dtype for v in weights.values()} == {torch.float16}  # save_precision = "fp16"
    metadata = _metadata(result.final_file)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_network_dim"] == str(flat["network_dim"])
    assert list((tmp_path / "out" / "sample").glob(f"{flat['output_name']}_e000001_*.png"))


def test_sdxl_db_example_fine_tunes_the_unet_in_bf16_with_fused_adafactor(tiny_run, folders, tmp_path):
    flat = _flat("sdxl_db")
    # The 24 GB recipe the example promises: U-Net only, bf16 weights, fused Adafactor, both caches, checkpointing
    assert flat["full_bf16"] and flat["mixed_precision"] == "bf16" and flat["fused_backward_pass"]
    assert flat["optimizer_type"] == "Adafactor" and flat["cache_text_encoder_outputs"] and flat["cache_latents"]
    assert flat["gradient_checkpointing"] and not flat.get("train_text_encoder") and flat["bucket_reso_steps"] % 32 == 0
    tiny = [a for a in TINY if a not in ("--optimizer_type", "AdamW", "--mixed_precision", "no")]
    result = sdxl_train.main(["--config_file", str(CONFIGS / "sdxl_db.toml"),
                              *[MODELS["sdxl_db"][1] if a == "tiny-sd1" else a for a in tiny], *tiny_run, *folders])
    assert result.global_step == 2 and result.method.parts.unet.dtype == torch.bfloat16
    weights = load_file(str(result.final_file))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}  # save_precision
    assert any(k.startswith("conditioner.embedders.1.model.") for k in weights)  # a whole SDXL checkpoint
    assert _metadata(result.final_file)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_sdxl_lora_example_refuses_an_sd1_model(tiny_run, folders, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sdxl_train_network.main(["--config_file", str(CONFIGS / "sdxl_lora.toml"), *TINY, *tiny_run, *folders])
    assert exit_info.value.code == 2
    assert "tiny-sd1: this is an SD 1.x model, and sdxl_train_network.py trains SDXL models" in capsys.readouterr().err


def test_lora_example_takes_the_dataset_toml(tiny_run, tmp_path):
    result, _ = _run("lora", *tiny_run, "--dataset_config", _dataset_copy(tmp_path))
    assert all(key.startswith("lora_") for key in load_file(str(result.final_file)))


def test_dreambooth_example_trains_with_prior_preservation(tiny_run, tmp_path):
    # num_class_images = 200 / class_infer_steps = 40 would generate 199 SD 1.5 images: 4 quick ones here.
    result, flat = _run("dreambooth", *tiny_run, "--dataset_config", _dataset_copy(tmp_path),
                        "--num_class_images", "4", "--class_infer_steps", "2")
    assert len(list((tmp_path / "ds_reg" / "shape").glob("class_*.png"))) == 3
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"} <= set(
        load_file(str(result.final_file)))
    metadata = _metadata(result.final_file)
    assert metadata["ss_prior_loss_weight"] == str(flat["prior_loss_weight"])
    # Reg images are used up to the training count (1 image x 1 repeat here), as sd-scripts balances them.
    assert metadata["ss_num_reg_images"] == "1" and metadata["ss_num_train_images"] == "1"


def test_textual_inversion_example_trains(tiny_run, folders):
    result, flat = _run("textual_inversion", *tiny_run, *folders)
    saved = torch.load(result.final_file, weights_only=True)
    assert saved["name"] == flat["token_string"] and saved["step"] == 2
    assert saved["string_to_param"]["*"].shape[0] == flat["num_vectors_per_token"]


def test_hypernetwork_example_trains(tiny_run, folders):
    # SD 1.5's attention widths (320,640,768,1280) are the tiny model's 32 and 64.
    result, flat = _run("hypernetwork", *tiny_run, *folders, "--hypernetwork_sizes", "32,64")
    saved = torch.load(result.final_file, weights_only=True)
    assert sorted(k for k in saved if isinstance(k, int)) == [32, 64] and saved["step"] == 2
    assert saved["layer_structure"] == [1, 2, 1] and saved["activation_func"] == flat["hypernetwork_activation_func"]


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
