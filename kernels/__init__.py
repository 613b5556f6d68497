"""Kernel families that implement `slimc::` ops on accelerators (loaded by lowering passes)."""
