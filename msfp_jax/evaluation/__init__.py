"""FID / sFID / IS evaluation: the FID Inception network, input pipelines, statistics, resumable rounds.

The command `python -m msfp_jax.evaluation.digits_score` scores the built-in digits model's samples.
"""
from msfp_jax.evaluation.features import NonFiniteImagesError, make_feature_fn, statistics_of_uint8_batches
from msfp_jax.evaluation.inception_weights import FIDInception, InceptionWeightsError, file_sha256, load_inception
from msfp_jax.evaluation.loop import EvalProtocolError, balanced_labels, evaluate
from msfp_jax.evaluation.preprocess import PIPELINES, to_network_input
from msfp_jax.evaluation.reference import ReferenceStatisticsError, load_or_compute_statistics, statistics_from_npz
from msfp_jax.evaluation.stats import (
                                 FeatureStatistics,
                                 FewSamplesWarning,
                                 MomentAccumulator,
                                 frechet_distance,
                                 inception_score,
)

__all__ = [
    "EvalProtocolError", "FIDInception", "FeatureStatistics", "FewSamplesWarning", "InceptionWeightsError",
    "MomentAccumulator", "NonFiniteImagesError", "PIPELINES", "ReferenceStatisticsError", "balanced_labels", "evaluate",
    "file_sha256", "frechet_distance", "inception_score", "load_inception", "load_or_compute_statistics",
    "make_feature_fn", "statistics_from_npz", "statistics_of_uint8_batches", "to_network_input",
]
