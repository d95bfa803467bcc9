"""Every shipped asset samples bit-identically to the arrays recorded before the core refactor
(`tests/make_golden_samples.py` wrote `tests/golden_samples.json`)."""

import json

import pytest

from make_golden_samples import CASES, OUT, draw, key

GOLDEN = json.loads(OUT.read_text())["samples"]


@pytest.mark.parametrize("asset,nfe,options", [(a, n, o) for a, cases in CASES.items() for n, o in cases],
                         ids=lambda v: str(v))
def test_asset_samples_are_unchanged(asset, nfe, options):
    expected = GOLDEN[key(asset, nfe, options)]
    got = draw(asset, nfe, options)
    assert got["nfe"] == expected["nfe"]
    assert got["sha256"] == expected["sha256"], (got["first"], expected["first"])
