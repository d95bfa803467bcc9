"""Metrics: sample-based distribution distances (toy data / features) and FID/KID with offline feature nets."""

from lit_fewstep.metrics.callbacks import NFESweepCallback, SampleGridCallback, ThroughputCallback
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
