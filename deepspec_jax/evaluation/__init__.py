"""Evaluation of speculative-decoding drafts: datasets, acceptance metrics, confidence
calibration, tables and plots. The CLI is ``python -m deepspec_jax.eval``."""

from deepspec_jax.evaluation.calibration import (ConfidenceCalibration, auroc_exact,
                                                 auroc_histogram, brier, ece)
from deepspec_jax.evaluation.datasets import (REFERENCE_TASKS, DatasetError, load_prompts,
                                              resolve_datasets)
from deepspec_jax.evaluation.metrics import RoundStats

__all__ = ["ConfidenceCalibration", "auroc_exact", "auroc_histogram", "brier", "ece",
           "REFERENCE_TASKS", "DatasetError", "load_prompts", "resolve_datasets", "RoundStats"]
