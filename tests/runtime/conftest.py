"""Runtime tests: quiet logs."""

from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs():
    """The router logs JSON lines; tests keep warnings and up."""
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
