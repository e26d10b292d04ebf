"""Fixtures of the fault tests: the integration suite's gateway, writer and upstream."""

from tests.integration.conftest import gateway, upstream, writer

__all__ = ["gateway", "upstream", "writer"]
