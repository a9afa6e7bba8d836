"""Tiny and real CLIP models (open_clip): build, pretrain, save and load as model packages."""
