"""Helpers of the prune and lowrank passes: per-architecture module lookup, importance criteria,
GQA-aware head pruning, depth pruning and low-rank modules."""
