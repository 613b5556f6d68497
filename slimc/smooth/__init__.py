"""Shared machinery of the smoothing passes: group selection, scale formulas, folding."""
