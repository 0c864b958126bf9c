"""No product module behaves differently under a test runner: nothing in core/, bot/ or
stembot/ reads pytest's variables or a switch meant for tests. Tests configure stembot as an
operator would (settings, the URLs of fake servers)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("core", "bot", "stembot")
# What code that changes its behaviour under a test runner reads or names.
TEST_SWITCH = re.compile(r"PYTEST_CURRENT_TEST|\bpytest\b|for_tests|allow_loopback|LOOPBACK_SWITCH", re.IGNORECASE)


def product_sources() -> list[Path]:
    return sorted(path for package in PRODUCT for path in (ROOT / package).rglob("*.py"))


def test_no_product_module_reads_a_test_switch():
    sources = product_sources()
    assert len(sources) > 50, "the product's modules were not found"
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sources
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if TEST_SWITCH.search(line)]
    assert found == []


def test_the_guard_catches_the_switch_that_was_removed():
    # Lines of the loopback switch core/net/fetcher.py had (issue #14): the guard must see them.
    for line in ('LOOPBACK_SWITCH = "STEMBOT_ALLOW_LOOPBACK_FETCH_FOR_TESTS"',
                 'if requested and "PYTEST_CURRENT_TEST" not in os.environ:',
                 "allow_loopback = loopback_allowed(allow_loopback_for_tests)",
                 'if "pytest" in sys.modules:'):
        assert TEST_SWITCH.search(line), line
