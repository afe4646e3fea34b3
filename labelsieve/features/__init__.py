"""The feature store: image embeddings extracted once per (model, file content), reused by every run."""

from labelsieve.features.store import Features, FeatureStore, extract_features

__all__ = ["FeatureStore", "Features", "extract_features"]
