"""Pure algorithms for choosing the specialists' class sets (Hinton et al. 2015, section 5).

Covariance accumulation of the generalist's outputs, k-means on its columns,
a quality figure and an offline inspection report. Takes tensors and arrays;
never imports the pipeline (``specialists``) or ``inference``.
"""

from clustering.covariance import CovarianceAccumulator
from clustering.kmeans import cluster_classes, column_features, describe_method, random_class_sets
from clustering.quality import ErrorPairShare, chance_pair_share, error_pair_share
from clustering.report import summary, write_report

__all__ = [
    "CovarianceAccumulator",
    "ErrorPairShare",
    "chance_pair_share",
    "cluster_classes",
    "column_features",
    "describe_method",
    "error_pair_share",
    "random_class_sets",
    "summary",
    "write_report",
]
