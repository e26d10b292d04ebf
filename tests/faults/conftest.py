"""Fixtures of the fault tests: the integration suite's gateway, writer and upstream, and
the soak's ``gateway serve`` process (for tests that read the gateway's /proc)."""

from tests.integration.conftest import gateway, upstream, writer
from tests.soak.test_soak import served

__all__ = ["gateway", "served", "upstream", "writer"]
