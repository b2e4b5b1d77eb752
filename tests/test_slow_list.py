"""The slow list in conftest.py names tests that exist, so none of them silently moves back into
`make test` (or out of the marker's reach) when a test is renamed."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import SLOW_TESTS

TESTS = Path(__file__).parent


def test_every_slow_entry_names_an_existing_test() -> None:
    for entry in SLOW_TESTS:
        file, name = entry.split("::")
        source = (TESTS / file).read_text()
        assert re.search(rf"^def {re.escape(name)}\(", source, re.MULTILINE), entry
