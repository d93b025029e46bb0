"""Settings: typed parsing of the environment into groups, clear errors, secrets hidden."""
import dataclasses
import ipaddress
import typing
from pathlib import Path

import pytest

from conftest import ROOT
from s2v_worker import settings as settings_module
from s2v_worker.settings import (GROUPS, SETTINGS, AddressingStyle, Device, Settings,
                                 SettingsError)


def test_defaults_without_environment():
    settings = Settings.from_env({})
    for setting in SETTINGS:
        assert getattr(getattr(settings, setting.group), setting.field) == setting.default
    assert not settings.storage.bucket_configured


def test_values_are_parsed_to_their_types():
    settings = Settings.from_env({
        "WAN_S2V_OFFLOAD": "true", "MAX_AUDIO_SECONDS": "12.5", "VIDEO_CRF": "20",
        "WAN_S2V_DEVICE": "CPU", "BUCKET_NAME": "b", "BUCKET_ACCESS_KEY_ID": "a",
        "BUCKET_SECRET_ACCESS_KEY": "s", "WORK_DIR": "/tmp/jobs", "WAN_S2V_WORLD_SIZE": "2",
        "ALLOWED_PRIVATE_NETWORKS": "10.0.0.0/8, ::1", "BUCKET_ADDRESSING_STYLE": "Virtual",
        "WAN_S2V_CFG_PARALLEL": "off", "WAN_S2V_WARMUP": "480p,720p"})
    assert (settings.model.offload, settings.media.max_audio_seconds, settings.video.crf) == (
        True, 12.5, 20)
    assert settings.model.device is Device.CPU and settings.model.device == "cpu"
    assert settings.folders.work_dir == Path("/tmp/jobs")
    assert settings.parallel.world_size == 2 and settings.parallel.cfg_parallel is False
    assert settings.network.allowed_private_networks == (ipaddress.ip_network("10.0.0.0/8"),
                                                        ipaddress.ip_network("::1/128"))
    assert settings.storage.bucket_addressing_style is AddressingStyle.VIRTUAL
    assert settings.storage.bucket_configured
    assert settings.model.warmup == ("480p", "720p")
    assert Settings.from_env({"WAN_S2V_WORLD_SIZE": "auto"}).parallel.world_size is None


def test_every_field_has_a_real_type():
    """No field is typed Any: each group's annotations are real types, and each default is one."""
    for group, kind in GROUPS.items():
        hints = typing.get_type_hints(kind, vars(settings_module))
        for field in dataclasses.fields(kind):
            assert hints[field.name] is not typing.Any, f"{group}.{field.name}"


@pytest.mark.parametrize("env, name", [
    ({"WAN_S2V_OFFLOAD": "maybe"}, "WAN_S2V_OFFLOAD"),
    ({"MAX_AUDIO_SECONDS": "-1"}, "MAX_AUDIO_SECONDS"),
    ({"WAN_S2V_DEVICE": "tpu"}, "WAN_S2V_DEVICE"),
    ({"MAX_IMAGE_BYTES": "lots"}, "MAX_IMAGE_BYTES"),
    ({"ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8, not-a-network"}, "ALLOWED_PRIVATE_NETWORKS"),
    ({"WAN_S2V_WARMUP": "1080p"}, "WAN_S2V_WARMUP"),
    ({"WAN_S2V_CFG_PARALLEL": "on"}, "WAN_S2V_CFG_PARALLEL"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_repr_hides_secrets():
    settings = Settings.from_env({"BUCKET_SECRET_ACCESS_KEY": "very-secret", "BUCKET_ACCESS_KEY_ID": "AKIA1"})
    for text in (repr(settings), repr(settings.storage), str(settings.storage)):
        assert "very-secret" not in text and "AKIA1" not in text


def test_every_variable_is_declared_once_in_one_group():
    names = [s.env for s in SETTINGS]
    assert len(names) == len(set(names))
    assert len({s.field for s in SETTINGS}) == len(SETTINGS)  # replace() names fields alone
    assert {s.group for s in SETTINGS} == set(GROUPS)


def test_replace_takes_values_or_text_and_keeps_the_rest():
    base = Settings.from_env({"VIDEO_CRF": "20"})
    changed = base.replace(work_dir="/tmp/x", job_timeout_s=60.0,
                           allowed_private_networks="127.0.0.0/8")
    assert changed.folders.work_dir == Path("/tmp/x") and changed.limits.job_timeout_s == 60.0
    assert changed.network.allowed_private_networks == (ipaddress.ip_network("127.0.0.0/8"),)
    assert changed.video.crf == 20 and base.folders.work_dir is None
    with pytest.raises(TypeError, match="no setting is named 'wrok_dir'"):
        base.replace(wrok_dir="/tmp")


def test_only_settings_read_the_environment():
    for path in (ROOT / "src" / "s2v_worker").glob("*.py"):
        if path.name != "settings.py":
            assert "os.environ" not in path.read_text(), path.name
