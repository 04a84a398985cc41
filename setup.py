"""Build script of aichat-backend: the ``aichat`` package, its twistd plugin and its schemas."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements() -> list[str]:
    """Runtime requirements from the pinned lock file, so pip and the RPM agree on versions."""
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="aichat-backend",
    version="1.0.0",
    description="AI chat backend: Klein HTTP API, OpenAI-compatible LLMs and MCP tools on Twisted",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="AGPL-3.0-only",
    python_requires=">=3.11",
    packages=[*find_packages(include=["aichat", "aichat.*"]), "twisted.plugins"],
    package_data={
        "aichat.schemas": ["*.json"],
        "aichat.store": ["migrations/*.sql", "migrations/postgres/*.sql"],
    },
    include_package_data=False,
    install_requires=requirements(),
    entry_points={"console_scripts": ["aichat-backend = aichat.cli:main"]},
    zip_safe=False,
)
