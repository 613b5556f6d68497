"""Transformation passes, one per module; `slimc.registry` finds every named `Pass` subclass here."""
