"""Transformation passes; one pass per module, registered in `slimc.registry.PASSES`."""
