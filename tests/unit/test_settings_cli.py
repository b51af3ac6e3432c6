"""Settings from GATEWAY_* variables, flags over them, and a CLI that explains itself."""

from __future__ import annotations

import pytest

from gateway.cli import main
from gateway.settings import Settings


def test_defaults_and_environment() -> None:
    s = Settings.from_env({})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.max_body_bytes == 1024 * 1024 and s.admin_token is None
    s = Settings.from_env({"GATEWAY_PORT": "9000", "GATEWAY_ADMIN_TOKEN": "t", "GATEWAY_WATCH": "true"})
    assert (s.port, s.admin_token, s.watch) == (9000, "t", True)


def test_flags_override_environment_and_round_trip() -> None:
    s = Settings.from_env({"GATEWAY_PORT": "9000", "GATEWAY_WORKERS": "2"}, port=7000, workers=None)
    assert (s.port, s.workers) == (7000, 2)
    assert Settings.from_env(s.as_env()) == s


def test_bad_setting_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"invalid setting: Expected `int`, got `str` - at `\$.port`"):
        Settings.from_env({"GATEWAY_PORT": "eighty"})
    with pytest.raises(ValueError, match="transport"):
        Settings.from_env({"GATEWAY_TRANSPORT": "carrier-pigeon"})


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["policy", "check", "--help"], ["up", "--help"]])
def test_every_command_explains_itself(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gateway")
    assert len(out.splitlines()) > 3


def test_serve_refuses_an_invalid_policy(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--policy", "/nonexistent.yaml"])
    assert info.value.code == 1
    assert capsys.readouterr().err.startswith("/nonexistent.yaml:1: cannot read policy")
