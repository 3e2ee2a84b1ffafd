"""Evaluation: the protocol (pure functions) and the on-device judge; the command is
`python -m lgrpo_jax.evaluate`."""

from lgrpo_jax.evaluation.judge import Judged, answer_slot_spec, judge
from lgrpo_jax.evaluation.protocol import (RANKING_MODES, Group, aggregate_samples, anchors_of, comparisons,
                                           image_scores, imagereward_accuracy, imagereward_counts, summarize)

__all__ = ["Group", "Judged", "RANKING_MODES", "aggregate_samples", "anchors_of", "answer_slot_spec", "comparisons",
           "image_scores", "imagereward_accuracy", "imagereward_counts", "judge", "summarize"]
