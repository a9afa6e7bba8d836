"""Locatability: clue weights, teacher labels, the CLIP student, bucket scoring and curation."""
