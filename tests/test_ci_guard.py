"""Under CI, a backend that is missing fails the run (tests/conftest.py) instead of skipping its tests."""
import pytest

import conftest
from attention import ops


def test_a_missing_cpp_extension_is_reported(monkeypatch):
    monkeypatch.setattr(ops, "EXTENSION_ERROR", "the C++ extension attention._C is not available (test)")
    assert "the C++ CPU kernels (attention._C): the C++ extension attention._C is not available (test)" in (
        conftest.missing_in_ci()
    )


def test_ci_fails_the_session_when_something_is_missing(monkeypatch):
    monkeypatch.setattr(conftest, "REQUIRED_IN_CI", [("the emulator", lambda: "not built")])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.exit.Exception, match="the emulator: not built"):
        conftest.pytest_sessionstart()
    monkeypatch.delenv("CI")
    conftest.pytest_sessionstart()  # outside CI a missing backend only skips its tests
