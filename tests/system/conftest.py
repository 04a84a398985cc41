"""tests/system holds the RPM + systemd system test (`make system-test`), not pytest tests."""

collect_ignore_glob = ["*"]
