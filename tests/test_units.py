"""Byte sizes: parsing option values, the exact spelling of defaults, and the one reading format."""

import pytest

from lowmem_paligemma.units import format_bytes, format_size, parse_size


@pytest.mark.parametrize(
    "text, n", [("5GB", 5 * 10**9), ("100KB", 100_000), ("1.5MB", 1_500_000), ("2GiB", 2 * 2**30), ("4096", 4096)]
)
def test_sizes(text, n):
    assert parse_size(text) == n
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("text", ["", "0", "-5GB", "5 parsecs", "GB", "nan"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "n, text",
    [(6_410_000_000, "6.41 GB"), (150_000_000, "0.15 GB"), (99_000_000, "99.0 MB"), (88_000, "88.0 KB"),
     (512, "512 B"), (None, "-")],
)  # fmt: skip
def test_format_bytes_is_decimal_everywhere(n, text):
    assert format_bytes(n) == text
