"""The aichat-backend command: Go-style flags, -validate, -version, -help and exit codes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aichat.cli import main, normalize
from tests.support import BIN, daemon_env


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script."""
    return subprocess.run(
        [str(BIN / "aichat-backend"), *args], env=env or daemon_env(), capture_output=True, text=True, timeout=60,
        cwd=cwd,
    )


def test_normalize_accepts_one_or_two_dashes() -> None:
    """Go-style -flag becomes --flag; short flags and values are untouched."""
    assert normalize(["-config", "a.yaml", "-validate", "--port=5", "-c", "b", "-port=6", "--", "-x"]) == [
        "--config", "a.yaml", "--validate", "--port=5", "-c", "b", "--port=6", "--", "-x",
    ]


def test_validate_valid_config_prints_summary_without_secrets(tmp_path: Path) -> None:
    """-validate on a good file exits 0 with a one-screen summary that hides the API key."""
    servers = tmp_path / "mcp-servers.json"
    servers.write_text('{"mcpServers": {"fs": {"command": "node", "args": ["x.js"], "enabled": false}}}')
    config = tmp_path / "config.yaml"
    config.write_text("llm:\n  api_key: ${MY_KEY}\nmcp:\n  servers_file: mcp-servers.json\n")
    result = run_cli("-config", str(config), "-validate", env=daemon_env(MY_KEY="sk-very-secret-key"))
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert "api_key=set" in result.stdout
    assert "sk-very-secret-key" not in result.stdout + result.stderr
    assert str(servers) in result.stdout
    assert len(result.stdout.splitlines()) <= 24


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"AICHAT_LLM_PROVIDER": "claude", "ANTHROPIC_API_KEY": "sk-ant-secret"},
            "provider=claude model=claude-3-5-haiku-20241022 base_url=https://api.anthropic.com (default) "
            "api_key=set",
        ),
        (
            {"AICHAT_LLM_PROVIDER": "google"},
            "provider=google model=gemini-2.5-flash base_url=https://generativelanguage.googleapis.com (default) "
            "api_key=not set",
        ),
        (
            {"AICHAT_LLM_PROVIDER": "ollama", "AICHAT_LLM_BASE_URL": "http://bob:pa55word@gpu:11434/v1"},
            "provider=ollama model=llama3.1:8b base_url=http://***@gpu:11434/v1 api_key=not set",
        ),
    ],
)
def test_validate_shows_the_provider(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    """-env-only -validate with AICHAT_LLM_PROVIDER set as PMM sets it: provider, default model, base URL
    (userinfo masked) and whether a key is set; no secret printed."""
    result = run_cli("-env-only", "-validate", env=daemon_env(**env), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout
    for secret in ("sk-ant-secret", "pa55word", "bob"):
        assert secret not in result.stdout + result.stderr


def test_validate_warns_about_an_unknown_provider(tmp_path: Path) -> None:
    """An unknown provider is valid (the OpenAI client is used) but -validate warns about it."""
    result = run_cli("-env-only", "-validate", env=daemon_env(AICHAT_LLM_PROVIDER="vllm"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: llm.provider 'vllm' is not a known provider: using the OpenAI-compatible client" in result.stdout


def test_validate_reports_every_problem_and_exits_1(tmp_path: Path) -> None:
    """-validate lists each problem with file, JSON path and a did-you-mean, and exits 1."""
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  prot: 1\n  port: 0\nllm:\n  api_key: [sk-hidden]\n")
    result = run_cli("--config", str(config), "--validate")
    assert result.returncode == 1
    assert f"{config}: $.server: unknown key 'prot' (did you mean 'port'?)" in result.stderr
    assert f"{config}: $.server.port: 0 is less than the minimum of 1" in result.stderr
    assert "sk-hidden" not in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_checks_the_mcp_servers_file(tmp_path: Path) -> None:
    """-validate also validates the MCP servers file the config names."""
    (tmp_path / "servers.json").write_text('{"mcpServers": {"bad": {"description": "no command or url"}}}')
    config = tmp_path / "config.yaml"
    config.write_text("mcp:\n  servers_file: servers.json\n")
    result = run_cli("-config", str(config), "-validate")
    assert result.returncode == 1
    assert "servers.json" in result.stderr
    assert "bad" in result.stderr


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown flags and bad values are usage errors: exit 2 and a hint, no traceback."""
    assert main(["-no-such-flag"]) == 2
    assert main(["-port", "99999"]) == 2
    assert main(["-log-level", "loud"]) == 2
    err = capsys.readouterr().err
    assert "Try 'aichat-backend -help'" in err
    assert "invalid port number: 99999" in err


def test_version_and_help() -> None:
    """-version prints the version; -help lists the flags with one or two dashes."""
    version = run_cli("-version")
    assert (version.returncode, version.stdout.strip()) == (0, "aichat-backend 1.0.0")
    helped = run_cli("-help")
    assert helped.returncode == 0
    for flag in ("--config", "--validate", "--env-only", "--port", "--log-level", "--version", "--database-url"):
        assert flag in helped.stdout
    assert "one or two dashes" in helped.stdout
    assert "aichat-backend db copy --from SRC --to DST [--force]" in helped.stdout
    db_help = run_cli("db", "--help")
    assert db_help.returncode == 0 and "--force" in db_help.stdout
    assert run_cli("db", "move").returncode == 2


def test_python_dash_m_is_the_same_command(tmp_path: Path) -> None:
    """python -m aichat behaves like aichat-backend."""
    (tmp_path / "mcp-servers.json").write_text('{"mcpServers": {}}')
    result = subprocess.run(
        [str(BIN / "python"), "-m", "aichat", "-env-only", "-validate"],
        env=daemon_env(), capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert "0 enabled of 0" in result.stdout


def test_missing_servers_file_is_a_warning(tmp_path: Path) -> None:
    """As in the reference, an absent MCP servers file means no servers; -validate says so."""
    config = tmp_path / "config.yaml"
    config.write_text("mcp:\n  servers_file: absent.json\n")
    result = run_cli("-config", str(config), "-validate")
    assert result.returncode == 0, result.stderr
    assert f"warning: MCP servers file {tmp_path / 'absent.json'} not found: no MCP servers" in result.stdout
