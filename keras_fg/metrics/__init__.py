"""Evaluation metrics: classification accuracy, attention against true regions, re-identification."""

from keras_fg.metrics.attention import attention_measures, attention_report, dilated_box_cells
from keras_fg.metrics.classification import (
    MeanPerClassAccuracy,
    classification_report,
    confusion_matrix,
    mean_per_class_accuracy,
    top_k_accuracy,
)
from keras_fg.metrics.re_ranking import k_reciprocal_re_ranking
from keras_fg.metrics.reid import (
    PROTOCOLS,
    evaluate_reid,
    evaluate_reid_without_cameras,
    pairwise_distances,
)
