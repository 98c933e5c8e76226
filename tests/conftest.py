"""Fixtures: a gateway in each deployment mode in front of a real MCP upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Deployment, deploy


@pytest.fixture(params=["proxy", "middleware"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The demo MCPServer (sessions, SSE answers) behind the gateway, as reverse proxy and as middleware."""
    deployment = deploy(request.param, tmp_path)
    yield deployment
    deployment.stop()


@pytest.fixture(params=["proxy", "middleware"])
def stateless_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The demo MCPServer in stateless JSON mode behind the gateway, in both deployment modes."""
    deployment = deploy(request.param, tmp_path, stateless=True, json_response=True)
    yield deployment
    deployment.stop()
