"""Faults injected on purpose, limits and a request-path fuzz (issue 9)."""
