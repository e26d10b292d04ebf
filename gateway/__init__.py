"""Sandbox port gateway: edge proxy and route-table control plane."""

__version__ = "0.1.0"
