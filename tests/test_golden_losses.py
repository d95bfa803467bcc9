"""Every tree config's logged losses over its first iterations are bit-identical to the recorded golden values
(tests/golden_losses.json, written by tests/make_golden_losses.py before the core refactor), on the processor they
were recorded on; within a relative 1e-4 on one with no record (see `golden.record_for_this_cpu`)."""

import json
from pathlib import Path

import pytest
import torch

from golden import CROSS_CPU_RTOL, record, record_for_this_cpu

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden_losses.json").read_text())


@pytest.mark.parametrize("method", sorted(GOLDEN["methods"]))
def test_losses_match_golden_bit_exactly(method):
    golden = GOLDEN["methods"][method]
    mine, exact, which = record_for_this_cpu(GOLDEN, "methods", method)
    rec = record(golden["config"], golden["iterations"], golden["seed"])
    where = (f"{method} ({golden['config']}; {which}; recorded with torch {golden['torch']} on "
             f"{GOLDEN['environment']['cpu_capability']}, now torch {torch.__version__} on "
             f"{torch.backends.cpu.get_cpu_capability()})")
    golden = dict(golden, losses=mine["losses"])
    assert rec.overrides == golden["overrides"], f"{where}: overrides changed"
    assert sorted(rec.losses) == sorted(golden["losses"]), f"{where}: logged loss names changed"
    for name, hexes in golden["losses"].items():
        expected = [float.fromhex(h) for h in hexes]
        got = rec.losses[name]
        at = golden["loss_iterations"][name]
        assert rec.loss_iterations[name] == at, (
            f"{where}: {name} logged at iterations {rec.loss_iterations[name]}, expected {at}")
        for i, (e, g) in enumerate(zip(expected, got)):
            assert g.hex() == e.hex() if exact else abs(g - e) <= CROSS_CPU_RTOL * abs(e), (
                f"{where}: {name} value {i} (iteration {at[i]}): expected {e!r} ({e.hex()}), got {g!r} ({g.hex()}), "
                f"difference {g - e:.3e}")
        assert len(got) == len(expected), f"{where}: {name} logged {len(got)} values, expected {len(expected)}"
