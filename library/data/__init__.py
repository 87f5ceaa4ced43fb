"""Datasets: subsets and folders, captions, bucketing, image loading, caches, batches."""
