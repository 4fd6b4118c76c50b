"""Evaluation: whole-image inference, metrics (medpy-compatible), summaries, reports and figures.

MONAI and matplotlib are imported only when a function needs them.
"""

from semidiff.evaluation.figures import (
    CLASS_COLOURS,
    label_to_rgb,
    overlay_figure_tensor,
    overlay_panel,
    overlay_rgb,
    pick_slice,
)
from semidiff.evaluation.inference import (
    InferenceMode,
    keep_largest_component,
    monai_overlap,
    predict_case,
    reference_sliding_window,
    slicewise_predict,
    sliding_window_predict,
    whole_image_predict,
)
from semidiff.evaluation.metrics import (
    METRIC_NAMES,
    EmptyRule,
    binary_metrics,
    case_metrics,
    format_summary_table,
    parse_empty_rule,
    summarize,
    write_metrics,
)

__all__ = [
    "CLASS_COLOURS",
    "METRIC_NAMES",
    "EmptyRule",
    "InferenceMode",
    "binary_metrics",
    "case_metrics",
    "format_summary_table",
    "keep_largest_component",
    "label_to_rgb",
    "monai_overlap",
    "overlay_figure_tensor",
    "overlay_panel",
    "overlay_rgb",
    "parse_empty_rule",
    "pick_slice",
    "predict_case",
    "reference_sliding_window",
    "slicewise_predict",
    "sliding_window_predict",
    "summarize",
    "whole_image_predict",
    "write_metrics",
]
