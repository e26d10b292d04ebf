"""The soak uses the integration suite's echo upstream on 127.0.0.2."""

from tests.integration.conftest import upstream

__all__ = ["upstream"]
