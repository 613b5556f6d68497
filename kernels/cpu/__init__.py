"""Kernel family cpu."""
