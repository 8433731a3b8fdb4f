"""Benchmarks, run from a source checkout (not part of the installed package): `bench.mesh` is
`make bench`, the mesh against transformers' generate (with `bench.speculative` for
--speculative); the other files are standalone measurement scripts and their recorded results."""
