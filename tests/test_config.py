"""Configuration loading: defaults, schema errors, placeholders, precedence, paths and secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from aichat.config import load_settings, token_digest
from aichat.settings_table import flag_values
from aichat.validation import ConfigError
from tests.support import write_config


def problems_of(path: Path, **kwargs: object) -> list[str]:
    """Load ``path`` expecting failure; return the problems as strings."""
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in caught.value.problems]


def test_defaults_when_default_file_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no config.yaml in the working directory the reference's defaults apply."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.server.port == 3001
    assert settings.server.host == "0.0.0.0"
    assert settings.llm.provider == "openai"
    assert settings.llm.model == "gpt-4o-mini"
    assert settings.llm.temperature == 0.7
    assert settings.database.path == "/var/lib/aichat-backend/aichat.db"
    assert settings.database.history_cache_mb == 64
    assert settings.mcp.servers_file == str(tmp_path / "mcp-servers.json")
    assert settings.chat.max_tool_rounds == 10
    assert settings.chat.approval.policy == "always"
    assert settings.config_path is None


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    """A config file named explicitly must exist."""
    problems = problems_of(tmp_path / "nope.yaml", environ={})
    assert len(problems) == 1
    assert "nope.yaml: $: cannot read file" in problems[0]


def test_unknown_keys_get_did_you_mean(tmp_path: Path) -> None:
    """Misspelt keys are errors that name the file, the path and the key probably meant."""
    path = write_config(tmp_path, "server:\n  prot: 80\nllm:\n  modle: x\nlogs: {}\n")
    problems = problems_of(path, environ={})
    assert f"{path}: $.server: unknown key 'prot' (did you mean 'port'?)" in problems
    assert f"{path}: $.llm: unknown key 'modle' (did you mean 'model'?)" in problems
    assert any(p.startswith(f"{path}: $: unknown key 'logs'") for p in problems)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Type, range and enum errors are all listed, each at its JSON path."""
    path = write_config(
        tmp_path,
        "server:\n  port: 70000\nllm:\n  provider: [gemini]\n  temperature: hot\nlogging:\n  level: loud\n",
    )
    problems = problems_of(path, environ={})
    paths = sorted(p.split(": ")[1] for p in problems)
    assert paths == ["$.llm.provider", "$.llm.temperature", "$.logging.level", "$.server.port"]
    assert any("70000 is greater than the maximum of 65535" in p for p in problems)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    """A YAML syntax error says where it is."""
    path = write_config(tmp_path, "server:\n  port: [1\n")
    problems = problems_of(path, environ={})
    assert len(problems) == 1
    assert "invalid YAML: line" in problems[0]


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    """A YAML list is not a configuration."""
    problems = problems_of(write_config(tmp_path, "- a\n- b\n"), environ={})
    assert "must be a mapping" in problems[0]


def test_placeholders_expand_with_defaults_and_types(tmp_path: Path) -> None:
    """${VAR} and ${VAR:-default} expand; a lone placeholder takes the YAML type of its value."""
    path = write_config(
        tmp_path,
        "server:\n  port: ${PORT}\n  host: ${HOST:-127.0.0.1}\nllm:\n  model: m-${SUFFIX}\n"
        "  api_key: ${UNSET_KEY}\n",
    )
    settings = load_settings(str(path), environ={"PORT": "4000", "SUFFIX": "x"})
    assert settings.server.port == 4000
    assert settings.server.host == "127.0.0.1"
    assert settings.llm.model == "m-x"
    assert settings.llm.api_key == ""
    assert settings.warnings == ("${UNSET_KEY} is not set; using an empty string",)


def test_precedence_flag_over_env_over_yaml(tmp_path: Path) -> None:
    """flag > AICHAT_* environment > YAML > default."""
    path = write_config(tmp_path, "server:\n  port: 4000\nllm:\n  model: yaml-model\n  provider: mock\n")
    env = {"AICHAT_PORT": "4001", "AICHAT_LLM_MODEL": "env-model"}
    settings = load_settings(str(path), environ=env)
    assert (settings.server.port, settings.llm.model) == (4001, "env-model")
    settings = load_settings(str(path), environ=env, flags=flag_values({"port": 4002}))
    assert (settings.server.port, settings.llm.model) == (4002, "env-model")
    assert load_settings(str(path), environ={}).server.port == 4000


def test_empty_environment_values_are_ignored(tmp_path: Path) -> None:
    """An empty AICHAT_* variable does not override the file (as in the reference)."""
    path = write_config(tmp_path, "server:\n  port: 4000\n")
    assert load_settings(str(path), environ={"AICHAT_PORT": ""}).server.port == 4000


def test_bad_environment_value_is_reported(tmp_path: Path) -> None:
    """A non-numeric AICHAT_PORT is a problem naming the variable."""
    problems = problems_of(write_config(tmp_path, "{}"), environ={"AICHAT_PORT": "abc"})
    assert problems == ["environment: AICHAT_PORT: not an integer: 'abc'"]


def test_openai_api_key_is_a_fallback(tmp_path: Path) -> None:
    """OPENAI_API_KEY fills llm.api_key only when nothing else set it."""
    path = write_config(tmp_path, "{}")
    assert load_settings(str(path), environ={"OPENAI_API_KEY": "sk-env"}).llm.api_key == "sk-env"
    both = {"OPENAI_API_KEY": "sk-env", "AICHAT_API_KEY": "sk-aichat"}
    assert load_settings(str(path), environ=both).llm.api_key == "sk-aichat"
    with_file = write_config(tmp_path, "llm:\n  api_key: sk-file\n", "other.yaml")
    assert load_settings(str(with_file), environ={"OPENAI_API_KEY": "sk-env"}).llm.api_key == "sk-file"


@pytest.mark.parametrize(
    ("provider", "model", "variables"),
    [
        ("claude", "claude-3-5-haiku-20241022", ["ANTHROPIC_API_KEY"]),
        ("anthropic", "claude-3-5-haiku-20241022", ["ANTHROPIC_API_KEY"]),
        ("gemini", "gemini-2.5-flash", ["GEMINI_API_KEY", "GOOGLE_API_KEY"]),
        ("google", "gemini-2.5-flash", ["GEMINI_API_KEY", "GOOGLE_API_KEY"]),
    ],
)
def test_claude_and_gemini_are_providers_with_their_own_keys(
    tmp_path: Path, provider: str, model: str, variables: list[str]
) -> None:
    """AICHAT_LLM_PROVIDER=claude|anthropic|gemini|google is accepted (the reference's names), with the
    provider's default model; the key falls back to the provider's variables in order, never to another
    provider's."""
    environ = {"AICHAT_LLM_PROVIDER": provider, "OPENAI_API_KEY": "sk-openai"}
    settings = load_settings(env_only=True, environ=environ)
    assert (settings.llm.provider, settings.llm.model, settings.llm.api_key) == (provider, model, "")
    assert settings.warnings == ()
    for n, variable in enumerate(variables):
        found = {**environ, **{v: f"key-{v}" for v in variables[n:]}}
        assert load_settings(env_only=True, environ=found).llm.api_key == f"key-{variable}"
    found = {**environ, "AICHAT_API_KEY": "key-aichat", **{v: "other" for v in variables}}
    assert load_settings(env_only=True, environ=found).llm.api_key == "key-aichat"


def test_unknown_provider_is_accepted_with_a_warning(tmp_path: Path) -> None:
    """An unknown provider keeps the reference's fallback to the OpenAI client, and says so."""
    settings = load_settings(env_only=True, environ={"AICHAT_LLM_PROVIDER": "vllm"})
    assert (settings.llm.provider, settings.llm.model) == ("vllm", "gpt-4o-mini")
    assert any("'vllm' is not a known provider" in w and "OpenAI-compatible" in w for w in settings.warnings)


def test_env_only_ignores_the_file(tmp_path: Path) -> None:
    """--env-only skips the YAML file entirely, even an invalid one."""
    path = write_config(tmp_path, "nonsense: true\n")
    settings = load_settings(str(path), env_only=True, environ={"AICHAT_PORT": "4100"})
    assert settings.server.port == 4100


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mcp.servers_file, database.path and logging.file are relative to the config file's folder."""
    folder = tmp_path / "etc"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write_config(
        folder, "mcp:\n  servers_file: servers.json\ndatabase:\n  path: ../var/db.sqlite\nlogging:\n  file: a.log\n"
    )
    settings = load_settings("etc/config.yaml", environ={})
    assert settings.mcp.servers_file == str(folder / "servers.json")
    assert settings.database.path == str(tmp_path / "var" / "db.sqlite")
    assert settings.logging.file == str(folder / "a.log")
    assert path.exists()


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    """An invalid api_key or token value is reported without echoing it."""
    path = write_config(
        tmp_path,
        "llm:\n  api_key: [sk-secret-value]\nauth:\n  tokens:\n    - {token: short-secret, user_id: 1}\n",
    )
    problems = problems_of(path, environ={})
    assert len(problems) == 2
    text = "\n".join(problems)
    assert "sk-secret-value" not in text
    assert "short-secret" not in text
    assert "***" in text


def test_secret_placeholders_of_digits_stay_strings(tmp_path: Path) -> None:
    """``${VAR}`` under a secret key keeps the text it expands to: a key of digits is not a number, works,
    and is never printed in a type error."""
    path = write_config(
        tmp_path,
        "llm:\n  api_key: ${KEY}\nauth:\n  tokens:\n    - {token: '${TOKEN}', user_id: 1}\n"
        "  admin_tokens: ['${ADMIN}']\nserver:\n  port: ${PORT}\n",
    )
    digits = {"KEY": "123456789012", "TOKEN": "9" * 20, "ADMIN": "8" * 20, "PORT": "4000"}
    settings = load_settings(str(path), environ=digits)
    assert settings.llm.api_key == "123456789012"
    assert dict(settings.auth.token_digests) == {token_digest("9" * 20): "1"}
    assert settings.auth.admin_digests == {token_digest("8" * 20)}
    assert settings.server.port == 4000, "placeholders outside secrets are still typed"


def test_secret_numbers_never_appear_in_errors(tmp_path: Path) -> None:
    """A key written as a bare YAML number is a type error that does not echo the number."""
    path = write_config(tmp_path, "llm:\n  api_key: 123456789012\nauth:\n  admin_tokens: [5555555555555555]\n")
    problems = problems_of(path, environ={})
    text = "\n".join(problems)
    assert len(problems) == 2, text
    assert "123456789012" not in text
    assert "5555555555555555" not in text


def test_tokens_are_kept_only_as_digests(tmp_path: Path) -> None:
    """Bearer tokens come from the environment and are stored hashed, mapped to user ids."""
    path = write_config(tmp_path, "auth:\n  tokens:\n    - {token: '${TOKEN}', user_id: 42}\n")
    settings = load_settings(str(path), environ={"TOKEN": "t" * 32})
    assert dict(settings.auth.token_digests) == {token_digest("t" * 32): "42"}
    assert "t" * 32 not in repr(settings)


def test_trusted_proxies_must_be_networks(tmp_path: Path) -> None:
    """A malformed CIDR is a problem at its path."""
    problems = problems_of(write_config(tmp_path, "auth:\n  trusted_proxies: ['10.0.0.0/8', 'nope']\n"), environ={})
    assert problems == [f"{tmp_path / 'config.yaml'}: $.auth.trusted_proxies[1]: not an IP network: 'nope'"]


def test_sqlite_dsn_sets_database_path(tmp_path: Path) -> None:
    """database.dsn accepts sqlite:PATH, resolved against the file's folder."""
    settings = load_settings(str(write_config(tmp_path, "database:\n  dsn: sqlite:data/x.db\n")), environ={})
    assert settings.database.path == str(tmp_path / "data" / "x.db")
    assert settings.database.engine == "sqlite"


def test_postgres_url_from_file_environment_and_flag(tmp_path: Path) -> None:
    """A PostgreSQL URL selects that engine from the file, AICHAT_DATABASE_URL or -database-url (flag wins)."""
    url = "postgres://ai_chat_user:s3cret@127.0.0.1:5432/ai_chat?sslmode=disable"
    config = write_config(tmp_path, f"database:\n  dsn: {url}\n  pool_size: 4\n")
    from_file = load_settings(str(config), environ={})
    assert (from_file.database.engine, from_file.database.dsn, from_file.database.pool_size) == ("postgres", url, 4)
    assert from_file.database.shown() == "postgres://ai_chat_user:***@127.0.0.1:5432/ai_chat?sslmode=disable"
    assert "s3cret" not in repr(from_file)
    from_env = load_settings(None, env_only=True, environ={"AICHAT_DATABASE_URL": "postgresql://u@db/x"})
    assert from_env.database.dsn == "postgresql://u@db/x"
    flagged = load_settings(
        None,
        env_only=True,
        environ={"AICHAT_DATABASE_URL": "postgresql://u@db/x"},
        flags=flag_values({"database-url": "postgres://v@other/y"}),
    )
    assert flagged.database.dsn == "postgres://v@other/y"
    by_path = load_settings(
        None, env_only=True, environ={"AICHAT_DATABASE_URL": "postgresql://u@db/x"},
        flags=flag_values({"database-path": str(tmp_path / "f.db")}),
    )
    assert (by_path.database.engine, by_path.database.path) == ("sqlite", str(tmp_path / "f.db"))


def test_unknown_database_scheme_names_the_key_without_the_password(tmp_path: Path) -> None:
    """An unknown scheme is a problem at the key it came from; the password is never echoed."""
    problems = problems_of(write_config(tmp_path, "database:\n  dsn: mysql://u:pw1@h/db\n"), environ={})
    assert problems == [
        f"{tmp_path / 'config.yaml'}: $.database.dsn: unknown database URL (scheme 'mysql'): "
        "use postgres://, postgresql:// or sqlite:PATH"
    ]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env_only=True, environ={"AICHAT_DATABASE_URL": "mongodb://u:pw2@h/db"})
    assert [str(p) for p in caught.value.problems] == [
        "environment: AICHAT_DATABASE_URL: unknown database URL (scheme 'mongodb'): "
        "use postgres://, postgresql:// or sqlite:PATH"
    ]


def test_history_cache_size(tmp_path: Path) -> None:
    """database.history_cache_mb sets the cache's memory (0 turns it off); a negative size is refused."""
    settings = load_settings(str(write_config(tmp_path, "database:\n  history_cache_mb: 0\n")), environ={})
    assert settings.database.history_cache_mb == 0
    problems = problems_of(write_config(tmp_path, "database:\n  history_cache_mb: -1\n", "neg.yaml"), environ={})
    assert len(problems) == 1 and "$.database.history_cache_mb" in problems[0]


def test_llm_options_take_any_json_value(tmp_path: Path) -> None:
    """``llm.options`` accepts objects and lists (a forced ``tool_choice``, ``stop``, ``logit_bias``,
    ``response_format``); values YAML reads as non-JSON types (dates) are refused at their path."""
    path = write_config(
        tmp_path,
        "llm:\n  options:\n"
        "    tool_choice: {type: function, function: {name: everything__echo}}\n"
        '    stop: ["\\n\\n", "User:"]\n'
        '    logit_bias: {"50256": -100}\n'
        "    response_format: {type: json_object}\n"
        "    max_tokens: 64\n"
        "    seed: null\n",
    )
    options = load_settings(str(path), environ={}).llm.options
    assert options["tool_choice"] == {"type": "function", "function": {"name": "everything__echo"}}
    assert options["stop"] == ["\n\n", "User:"]
    assert (options["logit_bias"], options["max_tokens"], options["seed"]) == ({"50256": -100}, 64, None)
    path = write_config(tmp_path, "llm:\n  options:\n    stop: [2024-01-02]\n")
    [problem] = problems_of(path, environ={})
    assert problem.startswith(f"{path}: $.llm.options.stop[0]: ")


def test_settings_of_many_instances(tmp_path: Path) -> None:
    """chat.turn_lease_seconds (default 10, at most 15) and chat.event_batch_seconds (default 0.02) are read;
    a lease longer than 15 s or a negative batch is refused naming the key."""
    defaults = load_settings(str(write_config(tmp_path, "")), environ={}).chat
    assert (defaults.turn_lease_seconds, defaults.event_batch_seconds) == (10.0, 0.02)
    chosen = load_settings(
        str(write_config(tmp_path, "chat:\n  turn_lease_seconds: 3\n  event_batch_seconds: 0\n", "c.yaml")), environ={}
    ).chat
    assert (chosen.turn_lease_seconds, chosen.event_batch_seconds) == (3, 0)
    refused = (("turn_lease_seconds: 30", "turn_lease_seconds"), ("event_batch_seconds: -1", "event_batch_seconds"))
    for text, key in refused:
        problems = problems_of(write_config(tmp_path, f"chat:\n  {text}\n", f"{key}.yaml"), environ={})
        assert len(problems) == 1 and f"$.chat.{key}" in problems[0]
