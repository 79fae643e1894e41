"""Annotator quality, Ray-free: the figures (`figures`: Krippendorff's alpha, agreement with
the consensus and with gold, position bias, lead-time outliers, weights), the rule judges
(`judges`), gold tasks (`gold`) and the loop's running view with what a round applies
(`tracker`), configured by `config.AnnotatorQualityConfig`."""

from rlhf.quality.config import AnnotatorQualityConfig
from rlhf.quality.gold import GoldFileError, check_gold_pool, gold_count, gold_from_file, mix_gold, rule_gold
from rlhf.quality.judges import Judge, JudgeConfig
from rlhf.quality.tracker import (
    BOTH_BAD,
    TIE,
    TRAINED_KINDS,
    AppliedQuality,
    QualitySummary,
    QualityTracker,
    format_table,
    gold_units,
    gold_value,
    judgements_of,
    preference_value,
    quality_row,
    store_summary,
    summarize,
)

__all__ = [
    "AnnotatorQualityConfig", "AppliedQuality", "BOTH_BAD", "GoldFileError", "Judge", "JudgeConfig", "QualitySummary",
    "QualityTracker", "TIE", "TRAINED_KINDS", "check_gold_pool", "format_table", "gold_count", "gold_from_file",
    "gold_units", "gold_value", "judgements_of", "mix_gold", "preference_value", "quality_row", "rule_gold",
    "store_summary", "summarize",
]
