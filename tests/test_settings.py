"""Settings: flags over variables over defaults, errors that name the variable, README coverage."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from timerd.errors import ConfigError
from timerd.settings import Settings, add_arguments, build_settings, env_name, flag_name


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_a_flag_wins_over_the_variable_which_wins_over_the_default() -> None:
    env = {"TIMERD_PORT": "9000", "TIMERD_HOST": "0.0.0.0", "TIMERD_LOOKAHEAD_S": "2.5"}
    settings = build_settings(parse("--port", "9100"), env)
    assert (settings.port, settings.host, settings.lookahead_s) == (9100, "0.0.0.0", 2.5)
    assert settings.store == Settings().store == "sqlite:///timerd.db"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TIMERD_PORT": "abc"}, "TIMERD_PORT"),
        ({"TIMERD_PORT": "70000"}, "TIMERD_PORT"),
        ({"TIMERD_LEASE_TTL_S": "nan"}, "TIMERD_LEASE_TTL_S"),
        ({"TIMERD_CONCURRENCY": "0"}, "TIMERD_CONCURRENCY"),
        ({"TIMERD_LEASE_RENEW_S": "6"}, "TIMERD_LEASE_RENEW_S"),
        ({"TIMERD_LOG_LEVEL": "loud"}, "TIMERD_LOG_LEVEL"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_settings(None, env)


def test_the_readme_lists_every_setting_as_flag_and_variable() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`{env_name(f.name)}`" in readme
        assert f"`{flag_name(f.name)}`" in readme
