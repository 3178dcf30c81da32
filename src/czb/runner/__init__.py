"""Spec resolution, dataset fetching, embedding sources and orchestration."""
