"""pretrained/options.py: LoadOptions validate themselves (each bad value is one OptionError naming its field)."""

import pytest

from lowmem_paligemma.errors import OptionError
from lowmem_paligemma.pretrained.options import LoadOptions


@pytest.mark.parametrize("requests", [0, -1, True, 1.5, "1"])
def test_requests_must_be_a_positive_count(requests):
    with pytest.raises(OptionError, match="requests") as e:
        LoadOptions(requests=requests)
    assert e.value.option == "requests"


def test_requests_default_to_many():
    assert LoadOptions().requests is None and LoadOptions(requests=3).requests == 3
