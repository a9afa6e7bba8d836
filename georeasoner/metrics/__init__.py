"""Evaluation metrics pinned by docs/conventions.md › Metrics."""

from georeasoner.metrics.distance import THRESHOLDS_KM, distance_metrics, geoscore
from georeasoner.metrics.location import city_metrics, country_metrics

__all__ = ["THRESHOLDS_KM", "city_metrics", "country_metrics", "distance_metrics", "geoscore"]
