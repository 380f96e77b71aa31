"""Runs: one stream through several methods, the Lab's run loop, benchmarks, the single place for defaults."""
