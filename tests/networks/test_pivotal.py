"""Pivotal tuning (--train_embeddings): new token embeddings trained with a network, bundled into its file as
AUTOMATIC1111 reads it (bundle_emb.<token>.string_to_param.* / .clip_l / .clip_g) and written as embedding files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_network
import train_network
from library.errors import UserError
from library.formats.embedding_files import load_embedding, load_sdxl_embedding
from library.generation import GenerationSetup, Generator
from library.methods.pivotal import EmbeddingSpec, parse_specs
from networks.files import bundled_embeddings
from tests.helpers import make_image_folder, tiny_lora_flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(tmp_path):
    return make_image_folder(tmp_path / "train", count=3, repeats=2, class_tokens="mychar dog").parent


def _run(tmp_path, out, *extra, steps=4, script=train_network, model="tiny-sd1"):
    argv = tiny_lora_flags(_data(tmp_path), tmp_path / out, "--train_embeddings", "mychar:3:dog",
                           "--embedding_lr", "1e-2", *extra, steps=steps, seed=2)
    argv[argv.index("tiny-sd1")] = model
    return script.main(argv)


def test_specs_parse_and_bad_ones_are_one_line_errors():
    assert parse_specs(["mychar:4", "style:2:oil painting", "solo"]) == [
        EmbeddingSpec("mychar", 4, None), EmbeddingSpec("style", 2, "oil painting"), EmbeddingSpec("solo", 1, None)]
    for bad, what in [("my.char:2", "without spaces, dots"), ("mychar:0", "1 or more"), ("mychar:x", "1 or more"),
                      ("a b:2", "without spaces")]:
        with pytest.raises(UserError, match=what):
            parse_specs([bad])
    with pytest.raises(UserError, match="given twice"):
        parse_specs(["Tok:1", "tok:2"])


def test_a_pivotal_run_bundles_the_embedding_and_reloads_with_both_applied(tmp_path, capsys):
    result = _run(tmp_path, "out")
    out = capsys.readouterr().out
    file = result.final_file
    weights = load_file(str(file))
    assert weights["bundle_emb.mychar.string_to_param.*"].shape == (3, 32)  # tiny-sd1's text encoder is 32 wide
    with safe_open(str(file), "pt") as f:
        assert f.metadata()["ss_bundled_embeddings"] == "mychar:3"
    method = result.method
    trained = method.embeddings.vectors()["mychar"]["emb_params"]
    assert torch.equal(weights["bundle_emb.mychar.string_to_param.*"], trained)
    # The vectors moved from their init word's rows ("dog" cycled) and the LoRA trained too.
    dog = method.parts.tokenizers[0].encode("dog", add_special_tokens=False)[0]
    base = method.embeddings.embeddings[0].base.weight[dog].float()
    assert not torch.allclose(trained[0], base)
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in weights.items())
    # The separate file, in sd-scripts' layout, holds the same vectors; the self-test read both back.
    separate = file.with_name("net-embeddings") / "mychar.safetensors"
    assert torch.equal(load_embedding(separate).vectors, trained)
    assert "saved net.safetensors: " in out and "saved net-embeddings/mychar.safetensors: an embedding of 3" in out
    # Reloaded for generation, the bundle installs the token and the network applies: the prompt's encoding is the
    # one training ended with (the token written out as its 3 vectors, through the text encoder's LoRA).
    generator = Generator(GenerationSetup("tiny-sd1", networks=[(str(file), 1.0)], width=32, height=32, steps=1))
    assert [e.tokens for e in generator.embeddings] == [("mychar", "mychar1", "mychar2")]
    prompt = ["a photo of mychar dog"]
    with torch.no_grad():
        reloaded = generator._encoder(None)(prompt)
        method.network.eval()
        at_end = method.encode_prompts(prompt)
    torch.testing.assert_close(reloaded, at_end, rtol=1e-5, atol=1e-6)
    without = Generator(GenerationSetup("tiny-sd1", width=32, height=32, steps=1))
    with torch.no_grad():
        assert not torch.allclose(without._encoder(None)(prompt), reloaded, atol=1e-3)


def test_network_weights_resumes_the_embeddings_and_refuses_to_drop_them(tmp_path):
    first = _run(tmp_path, "a").final_file
    vectors = load_file(str(first))["bundle_emb.mychar.string_to_param.*"]
    data = _data(tmp_path)
    flags = tiny_lora_flags(data, tmp_path / "b", "--network_weights", str(first), steps=1, seed=2)
    with pytest.raises(SystemExit) as err:
        train_network.main(flags)  # without --train_embeddings the bundle would be lost from the saved file
    assert err.value.code == 2
    resumed = train_network.main(flags + ["--train_embeddings", "mychar:3", "--embedding_lr", "0"])
    # lr 0: the embedding starts from the file's vectors and stays there
    assert torch.equal(resumed.method.embeddings.vectors()["mychar"]["emb_params"], vectors)
    with pytest.raises(SystemExit):
        train_network.main(flags + ["--train_embeddings", "mychar:2"])  # the file holds 3 vectors


def test_tokens_missing_from_captions_and_cached_text_outputs_are_refused(tmp_path, capsys):
    data = _data(tmp_path)
    for extra, message in [(["--train_embeddings", "otherchar:2"], "no training caption contains 'otherchar'"),
                           (["--train_embeddings", "mychar:2", "--network_train_unet_only",
                             "--cache_text_encoder_outputs"], "cannot be used while the text encoder is trained")]:
        with pytest.raises(SystemExit) as err:
            train_network.main(tiny_lora_flags(data, tmp_path / "o", *extra, steps=1))
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_unet_only_network_still_trains_the_embedding(tmp_path):
    """Also: each save's embedding folder goes when --save_last_n_steps rotates its file out."""
    result = _run(tmp_path, "u", "--network_train_unet_only", "--save_every_n_steps", "1", "--save_last_n_steps", "1",
                  steps=4)
    files = sorted(p.name for p in (tmp_path / "u").glob("net*.safetensors"))
    folders = sorted(p.name for p in (tmp_path / "u").glob("net*-embeddings"))
    assert "net-step00000001.safetensors" not in files and len(files) >= 2
    assert folders == sorted(f.removesuffix(".safetensors") + "-embeddings" for f in files)
    weights = load_file(str(result.final_file))
    assert not any(k.startswith("lora_te") for k in weights)
    method = result.method
    dog = method.parts.tokenizers[0].encode("dog", add_special_tokens=False)[0]
    start = method.embeddings.embeddings[0].base.weight[dog].float().expand(3, -1)  # the init word's row, 3 times
    assert not torch.allclose(weights["bundle_emb.mychar.string_to_param.*"], start)


def test_sdxl_bundles_clip_l_and_clip_g(tmp_path):
    result = _run(tmp_path, "x", "--resolution", "64", steps=2, script=sdxl_train_network, model="tiny-sdxl")
    weights = load_file(str(result.final_file))
    bundle = bundled_embeddings(weights, ("clip_l", "clip_g"), source="x")
    assert [tuple(v.shape) for v in bundle["mychar"]] == [(3, 32), (3, 64)]
    separate = load_sdxl_embedding(result.final_file.with_name("net-embeddings") / "mychar.safetensors")
    assert torch.equal(separate.vectors["clip_g"], bundle["mychar"][1])


def test_tools_carry_the_bundle_and_say_what_a_checkpoint_cannot_hold(tmp_path, capsys):
    from tools import check_lora_weights, merge_lora, resize_lora, svd_merge_lora

    file = _run(tmp_path, "t", steps=2).final_file
    bundle = {k: v for k, v in load_file(str(file)).items() if k.startswith("bundle_emb.")}
    capsys.readouterr()
    resize_lora.main(["--model", str(file), "--save_to", str(tmp_path / "r.safetensors"), "--new_rank", "2"])
    svd_merge_lora.main(["--models", str(file), "--save_to", str(tmp_path / "s.safetensors"), "--new_rank", "2"])
    merge_lora.main(["--models", str(file), "--save_to", str(tmp_path / "m.safetensors")])
    for name in ("r", "s", "m"):
        out = load_file(str(tmp_path / f"{name}.safetensors"))
        assert all(torch.equal(out[k], v) for k, v in bundle.items()) and bundle.keys() <= out.keys(), name
    with pytest.raises(SystemExit):  # two files bundling the same word cannot become one
        merge_lora.main(["--models", str(file), str(tmp_path / "m.safetensors"), "--save_to",
                         str(tmp_path / "x.safetensors")])
    assert "both bundle an embedding named 'mychar'" in capsys.readouterr().err
    merge_lora.main(["--sd_model", "tiny-sd1", "--models", str(file), "--save_to", str(tmp_path / "ck.safetensors")])
    assert "its bundled embeddings (mychar) are new words" in capsys.readouterr().out
    check_lora_weights.main([str(file), "--loaders", "tiny-sd1"])
    out = capsys.readouterr().out
    assert "bundled embedding 'mychar': string_to_param (3, 32)" in out
    assert "modules map in diffusers, ComfyUI, A1111" in out  # the bundle is not a module any loader misses
