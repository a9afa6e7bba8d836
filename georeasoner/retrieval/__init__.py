"""Retrieval-augmented geolocation: CLIP galleries in FAISS (``build_index``), a kNN geolocator
(``geolocate`` with ``engine: knn``) and the no-leakage check of evaluation galleries."""

from georeasoner.retrieval.leakage import LeakageError, check_no_leakage, find_leaks

__all__ = ["LeakageError", "check_no_leakage", "find_leaks"]
