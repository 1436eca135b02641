"""Benchmarks: commands that print measured figures (medians, ratios against a baseline run alongside)."""
