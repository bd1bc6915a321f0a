"""The ``hostile`` marker, and the fd budget the big scenarios need."""

from __future__ import annotations

import resource
from typing import Callable, Iterator

import pytest

from tests.conftest import unavailable


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hostile: a hostile-client scenario (tests/hostile/): a peer that misbehaves "
        "on purpose, on loopback, bounded in time, ending with leak checks")


@pytest.fixture
def fd_budget() -> Iterator[Callable[[int], None]]:
    """``fd_budget(n)``: make sure this process may open ``n`` fds (raise the soft limit).

    CI runners often start with a soft RLIMIT_NOFILE of 1,024; the scenarios with
    a thousand connections need both ends of each in this process. The previous
    limit is restored afterwards; a hard limit below ``n`` skips the test.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def need(count: int) -> None:
        if soft != resource.RLIM_INFINITY and soft < count:
            if hard != resource.RLIM_INFINITY and hard < count:
                unavailable(f"needs {count} fds; the hard RLIMIT_NOFILE is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))

    yield need
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
