"""Evaluation: the metrics table, the zero-shot baseline and the report."""
