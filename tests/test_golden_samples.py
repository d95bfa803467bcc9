"""Every shipped asset samples bit-identically to the arrays recorded before the core refactor
(`tests/make_golden_samples.py` wrote `tests/golden_samples.json`), on the processor they were recorded on; on one with
no record, the first values agree within a relative 1e-4 (see `golden.record_for_this_cpu`)."""

import json

import pytest

from golden import CROSS_CPU_RTOL, record_for_this_cpu
from make_golden_samples import CASES, OUT, draw, key

GOLDEN = json.loads(OUT.read_text())


@pytest.mark.parametrize("asset,nfe,options", [(a, n, o) for a, cases in CASES.items() for n, o in cases],
                         ids=lambda v: str(v))
def test_asset_samples_are_unchanged(asset, nfe, options):
    expected, exact, which = record_for_this_cpu(GOLDEN, "samples", key(asset, nfe, options))
    got = draw(asset, nfe, options)
    assert got["nfe"] == expected["nfe"]
    if exact:
        assert got["sha256"] == expected["sha256"], (which, got["first"], expected["first"])
    else:
        first = [(float.fromhex(g), float.fromhex(e)) for g, e in zip(got["first"], expected["first"])]
        assert all(abs(g - e) <= CROSS_CPU_RTOL * max(abs(e), 1e-3) for g, e in first), (which, first)
