"""The settings table: one row per setting gives its flag, its variable, its coercion and its help."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.python import usage

from aichat.config import LLMSettings, Settings, load_settings
from aichat.settings_table import (
    SETTINGS,
    Setting,
    by_key,
    default_of,
    environment_values,
    flag_values,
    integer,
    option_parameters,
)
from aichat.tap import Options
from aichat.validation import Problem


def test_every_row_names_a_real_setting_once() -> None:
    """Each row's key is a field of the settings records, and no key, flag or variable is spelled twice."""
    for row in SETTINGS:
        default_of(row.key, Settings)  # raises KeyError for a key that is not a setting
    for attribute in ("key", "flag", "env"):
        spelled = [getattr(row, attribute) for row in SETTINGS if getattr(row, attribute)]
        assert len(spelled) == len(set(spelled)), attribute


def test_default_comes_from_the_records() -> None:
    """default_of reads the typed records, the one place a default is written."""
    assert default_of("server.port", Settings) == 3001
    assert default_of("mcp.servers_file", Settings) == "mcp-servers.json"
    assert default_of("logging.level", Settings) == "info"


def test_help_names_key_variable_and_default() -> None:
    """-help shows, for each flag, its key, its variable and its default."""
    text = str(Options())
    for row in SETTINGS:
        assert f"--{row.flag}" in text
    port = next(line for line in option_parameters(Settings) if line[0] == "port")
    assert "server.port; $AICHAT_PORT; default: 3001" in port[3]
    model = next(line for line in option_parameters(Settings) if line[0] == "llm-model")
    assert "default: the provider's own" in model[3]


def test_flags_and_variables_share_one_coercer() -> None:
    """A value is parsed the same way from a flag and from its variable."""
    problems: list[Problem] = []
    assert environment_values({"AICHAT_LOG_LEVEL": "WARNING", "AICHAT_PORT": "4100"}, problems) == {
        "logging.level": "warn",
        "server.port": 4100,
    }
    assert problems == []
    options = Options()
    options.parseOptions(["--log-level", "WARNING", "--port", "4100", "--env-only"])
    assert {key: options.overrides()[key] for key in ("logging.level", "server.port")} == {
        "logging.level": "warn",
        "server.port": 4100,
    }
    environment_values({"AICHAT_PORT": "70000", "AICHAT_LOG_LEVEL": "loud"}, problems)
    assert [(p.path, p.message) for p in problems] == [
        ("AICHAT_PORT", "invalid port number: 70000"),
        ("AICHAT_LOG_LEVEL", "log level must be one of debug, info, warn, error, critical"),
    ]
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--port", "70000", "--env-only"])


def test_a_switch_sets_its_own_value() -> None:
    """A switch's value is declared on its row, so a new boolean setting cannot inherit another's."""
    rows = (
        Setting("logging.format", "JSON logs.", "log-json", "AICHAT_LOG_JSON", switch="json"),
        Setting("chat.title_generation", "Titles.", "titles", "AICHAT_TITLES", switch=True),
    )
    assert flag_values({"log-json": 1, "titles": 0}, rows) == {"logging.format": "json"}
    assert flag_values({"log-json": 0, "titles": 1}, rows) == {"chat.title_generation": True}
    assert environment_values({"AICHAT_TITLES": "yes", "AICHAT_LOG_JSON": "no"}, [], rows) == {
        "chat.title_generation": True
    }


def test_absent_and_empty_flags_are_not_given() -> None:
    """twistd's None and 0 for absent options, and an empty value, give nothing; a path flag clears the URL."""
    assert flag_values({"port": None, "log-json": 0, "host": ""}) == {}
    assert flag_values({"database-path": "/tmp/x.db"}) == {"database.path": "/tmp/x.db", "database.dsn": ""}
    both = flag_values({"database-path": "/tmp/x.db", "database-url": "postgres://u@h/d"})
    assert both == {"database.path": "/tmp/x.db", "database.dsn": "postgres://u@h/d"}
    with pytest.raises(ValueError, match="not an integer: 'x'"):
        integer("x")
    assert by_key("llm.base_url").env == "AICHAT_LLM_BASE_URL"


def test_every_variable_reaches_its_setting() -> None:
    """Each row's variable, set alone, lands in the loaded settings at its key."""
    samples = {"server.port": "4321", "logging.level": "error", "logging.format": "true",
               "llm.provider": "mock", "llm.base_url": "http://h/v1",
               "database.dsn": "sqlite:/tmp/aichat-table.db"}
    for row in SETTINGS:
        assert row.env
        raw = samples.get(row.key, "/tmp/value")
        settings = load_settings(None, env_only=True, environ={row.env: raw})
        section, name = row.key.split(".")
        value = getattr(getattr(settings, section), name)
        if row.key == "database.dsn":
            assert settings.database.path == "/tmp/aichat-table.db"
        elif row.key == "logging.format":
            assert value == "json"
        else:
            assert str(value) == raw, row.key


def test_model_default_follows_the_provider() -> None:
    """An empty model is the provider's default, from the catalog, however the record is built."""
    assert LLMSettings().model == "gpt-4o-mini"
    assert LLMSettings(provider="claude").model == "claude-3-5-haiku-20241022"
    assert LLMSettings(provider="mock", model="m").model == "m"
    assert dataclasses.replace(LLMSettings(provider="gemini")).model == "gemini-2.5-flash"
