"""Sandbox port gateway: edge proxy and route-table control plane."""

from gateway import compiled as _compiled

__version__ = "0.1.0"

# Before any compiled module can be imported: never run an old build of edited code.
_compiled.refuse_stale_build()
