"""Metrics: sample-based distribution distances (toy data / features) and FID/KID with offline feature nets.

The training callbacks (`SampleGridCallback`, `NFESweepCallback`, `ThroughputCallback`) live in
`lit_fewstep.callbacks`, above the methods they sample; configs name them `lit_fewstep.metrics.<Name>`, which
`__getattr__` below resolves on first use (importing this package never imports the methods).
"""

from __future__ import annotations

from typing import Any

from lit_fewstep.metrics.distribution import MMD, ExactNLL, PrecisionRecall, SlicedWasserstein2
from lit_fewstep.metrics.features import (
    DigitsClassifier,
    DigitsFeatures,
    load_digits_classifier,
    load_digits_features,
)
from lit_fewstep.metrics.fid import (
    InceptionFeatures,
    frechet_distance,
    gaussian_stats,
    make_fid,
    make_kid,
    reference_stats,
)

__all__ = [
    "SlicedWasserstein2",
    "MMD",
    "ExactNLL",
    "PrecisionRecall",
    "make_fid",
    "make_kid",
    "frechet_distance",
    "gaussian_stats",
    "InceptionFeatures",
    "reference_stats",
    "DigitsClassifier",
    "DigitsFeatures",
    "load_digits_classifier",
    "load_digits_features",
    "SampleGridCallback",
    "NFESweepCallback",
    "ThroughputCallback",
]

_CALLBACKS = ("SampleGridCallback", "NFESweepCallback", "ThroughputCallback")


def __getattr__(name: str) -> Any:
    """`lit_fewstep.metrics.SampleGridCallback` etc.: lazy aliases of `lit_fewstep.callbacks` (see the docstring)."""
    if name in _CALLBACKS:
        from lit_fewstep import callbacks  # the layer rule's one exception: a lazy alias, never run on import

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CALLBACKS))
