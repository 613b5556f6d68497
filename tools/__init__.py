"""Command-line tools (`slimc`, `slimc-opt`) and benchmark scripts."""
