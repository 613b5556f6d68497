"""Analyses: facts computed from a program that passes share (groups, statistics)."""
