"""Shared fixtures: the built-in toy model, and the optional ../shared testbed."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TESTBED = SHARED / "testbed" / "tiny-opt-dev"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def toy_path() -> str:
    """The toy OPT folder (built and cached on first use, about half a minute)."""
    import toy

    return toy.toy_model_path()


@pytest.fixture(scope="session")
def testbed() -> Path:
    if not (TESTBED / "config.json").is_file():
        pytest.skip("../shared/testbed is not present")
    return TESTBED
