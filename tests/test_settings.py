"""Settings: typed parsing of the environment, clear errors, secrets hidden, README in sync."""
import pytest

from conftest import ROOT
from s2v_worker.settings import SETTINGS, Settings, SettingsError, settings_table_markdown


def test_defaults_without_environment():
    settings = Settings.from_env({})
    for setting in SETTINGS:
        assert getattr(settings, setting.field) == setting.default
    assert not settings.bucket_configured


def test_values_are_parsed_to_their_types():
    settings = Settings.from_env({"WAN_S2V_OFFLOAD": "true", "MAX_AUDIO_SECONDS": "12.5",
                                  "VIDEO_CRF": "20", "WAN_S2V_DEVICE": "CPU", "BUCKET_NAME": "b",
                                  "BUCKET_ACCESS_KEY_ID": "a", "BUCKET_SECRET_ACCESS_KEY": "s"})
    assert (settings.offload, settings.max_audio_seconds, settings.video_crf, settings.device) == (
        True, 12.5, 20, "cpu")
    assert settings.bucket_configured


@pytest.mark.parametrize("env, name", [
    ({"WAN_S2V_OFFLOAD": "maybe"}, "WAN_S2V_OFFLOAD"),
    ({"MAX_AUDIO_SECONDS": "-1"}, "MAX_AUDIO_SECONDS"),
    ({"WAN_S2V_DEVICE": "tpu"}, "WAN_S2V_DEVICE"),
    ({"MAX_IMAGE_BYTES": "lots"}, "MAX_IMAGE_BYTES"),
    ({"ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8, not-a-network"}, "ALLOWED_PRIVATE_NETWORKS"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_repr_hides_secrets():
    settings = Settings.from_env({"BUCKET_SECRET_ACCESS_KEY": "very-secret", "BUCKET_ACCESS_KEY_ID": "AKIA1"})
    assert "very-secret" not in repr(settings) and "AKIA1" not in repr(settings)


def test_every_variable_is_declared_once():
    names = [s.env for s in SETTINGS]
    assert len(names) == len(set(names))
    assert len({s.field for s in SETTINGS}) == len(SETTINGS)


def test_readme_settings_table_is_generated_from_the_declarations():
    assert settings_table_markdown() in (ROOT / "README.md").read_text()


def test_only_settings_read_the_environment():
    for path in (ROOT / "src" / "s2v_worker").glob("*.py"):
        if path.name != "settings.py":
            assert "os.environ" not in path.read_text(), path.name
