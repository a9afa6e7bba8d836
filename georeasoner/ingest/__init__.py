"""Ingest real photos into a manifest."""
