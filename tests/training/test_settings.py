"""NoiseSettings and LossSettings: typed slices of the run config whose names and defaults come from the
declarations alone (library/config/declarations.py), read once per run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from library.config.declarations import OPTIONS
from library.config.options import ALL_SCRIPTS, NETWORK
from library.config.resolve import resolve
from library.config.settings import settings_from_config
from library.training.losses import LossSettings, training_loss
from library.training.noise import NoiseSettings, draw_noise, make_noise_scheduler

DECLARED = {o.name: o for o in OPTIONS}
SETTINGS = [NoiseSettings, LossSettings]


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", SETTINGS)
def test_every_field_is_a_declared_option(cls):
    assert _names(cls) and not [name for name in _names(cls) if name not in DECLARED]
    # and no field restates a default by hand: from_config is the only way to build one
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(cls))


@pytest.mark.parametrize("script", sorted(ALL_SCRIPTS))
@pytest.mark.parametrize("cls", SETTINGS)
def test_default_run_config_gives_the_declared_defaults(cls, script):
    declared = {name: DECLARED[name].for_script(script).default for name in _names(cls)}
    settings = cls.from_config(resolve([], script, OPTIONS))
    assert dataclasses.asdict(settings) == declared
    # a plain mapping with the keys left out means the same
    assert cls.from_config({}) == settings


def test_set_values_are_read_and_none_means_the_declared_default():
    config = resolve(["--noise_offset", "0.05", "--min_timestep", "10", "--multires_noise_iterations", "6",
                      "--loss_type", "huber", "--huber_c", "0.3", "--min_snr_gamma", "5",
                      "--debiased_estimation_loss"], NETWORK, OPTIONS)
    noise, loss = NoiseSettings.from_config(config), LossSettings.from_config(config)
    assert (noise.noise_offset, noise.min_timestep, noise.multires_noise_iterations) == (0.05, 10, 6)
    assert noise.multires_noise_discount == DECLARED["multires_noise_discount"].default
    assert (loss.loss_type, loss.huber_c, loss.min_snr_gamma, loss.debiased_estimation_loss) == ("huber", 0.3, 5, True)
    # None (a GUI's "unset") falls back to the declaration, not to None
    assert LossSettings.from_config({"huber_c": None}).huber_c == DECLARED["huber_c"].default
    assert NoiseSettings.from_config({"multires_noise_discount": None}).multires_noise_discount == \
        DECLARED["multires_noise_discount"].default


def test_per_script_defaults_follow_the_run_configs_script(monkeypatch):
    import library.config.settings as settings_module

    option = DECLARED["huber_c"]
    monkeypatch.setitem(settings_module._DECLARED, "huber_c", dataclasses.replace(option, per_script=((NETWORK, 0.7),)))
    config = resolve([], NETWORK, OPTIONS).replace(huber_c=None)
    assert LossSettings.from_config(config).huber_c == 0.7
    assert LossSettings.from_config({}).huber_c == option.default


def test_settings_are_frozen_and_an_undeclared_field_is_refused():
    settings = NoiseSettings.from_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.noise_offset = 0.1

    @dataclasses.dataclass(frozen=True)
    class Typo:
        noise_ofset: float | None

    with pytest.raises(KeyError):
        settings_from_config(Typo, {})


def test_settings_from_a_resolved_config_draw_and_weigh_as_the_same_options_given_directly():
    """The run config (RunConfig, every option present) and a plain dict of the set options build equal settings,
    so draws and losses do not depend on which one a caller had."""
    flags = ["--noise_offset", "0.1", "--ip_noise_gamma", "0.1", "--max_timestep", "900", "--min_snr_gamma", "2",
             "--prior_loss_weight", "0.5"]
    config = resolve(flags, NETWORK, OPTIONS)
    given = {"noise_offset": 0.1, "ip_noise_gamma": 0.1, "max_timestep": 900, "min_snr_gamma": 2.0,
             "prior_loss_weight": 0.5}
    assert NoiseSettings.from_config(config) == NoiseSettings.from_config(given)
    assert LossSettings.from_config(config) == LossSettings.from_config(given)

    scheduler = make_noise_scheduler(v_parameterization=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    draw = draw_noise(scheduler, latents, NoiseSettings.from_config(config), torch.Generator().manual_seed(1))
    plain = draw_noise(scheduler, latents, NoiseSettings.from_config({}), torch.Generator().manual_seed(1))
    assert not torch.equal(draw.noise, plain.noise)  # the offset was applied
    assert draw.timesteps.max() < 900
    loss, per_sample = training_loss(draw.noisy_latents, latents, draw.timesteps, torch.tensor([True, False]),
                                     scheduler, LossSettings.from_config(config), v_parameterization=False)
    unweighted = ((draw.noisy_latents - latents) ** 2).mean(dim=(1, 2, 3))
    assert per_sample[0] < unweighted[0]  # prior_loss_weight 0.5 (and min-SNR weight <= 1) applied
