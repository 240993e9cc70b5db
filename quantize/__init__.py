"""Merging and GGUF export with measured quality loss (issue: quantize)."""
