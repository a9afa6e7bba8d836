"""Batch geolocation: every image under a prefix (or in a manifest) answered by the VLM package."""
