"""Shared machinery every job uses: configs, storage, Ray, outputs, progress."""
