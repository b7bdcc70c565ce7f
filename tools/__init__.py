"""Development tools (not part of the product): the docs' configuration-table generator, a free local port for
the tests and benchmarks."""
