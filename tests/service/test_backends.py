"""``service.backends``: which errors are outages, and retrying through one."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError, ResponseStreamingError
from sqlalchemy import exc as sa_exc

from robustact.service.backends import is_outage, retrying


def _operational() -> sa_exc.OperationalError:
    return sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_outages_are_connection_failures_not_bad_data():
    assert is_outage(_operational())
    assert is_outage(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_outage(ResponseStreamingError(error="Connection broken: IncompleteRead(0 bytes read)"))
    assert is_outage(sa_exc.TimeoutError("no free connection"))
    assert not is_outage(sa_exc.IntegrityError("INSERT", {}, ValueError("duplicate key")))
    assert not is_outage(sa_exc.DataError("INSERT", {}, ValueError("invalid input syntax for type json")))
    assert not is_outage(ValueError("bad"))


def test_retrying_rides_out_an_outage_with_growing_waits():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise _operational()
        return "done"

    assert retrying(flaky, "write", budget_s=60, sleep=waits.append) == "done"
    assert len(calls) == 4 and waits == [0.5, 1.0, 2.0]


def test_retrying_gives_up_after_its_budget_and_raises_other_errors_at_once():
    waits = []

    def down():
        raise _operational()

    with pytest.raises(sa_exc.OperationalError):
        retrying(down, "write", budget_s=0.0, sleep=waits.append)
    assert waits == []

    calls = []

    def broken():
        calls.append(1)
        raise sa_exc.IntegrityError("INSERT", {}, ValueError("duplicate key"))

    with pytest.raises(sa_exc.IntegrityError):
        retrying(broken, "write", budget_s=60, sleep=waits.append)
    assert calls == [1] and waits == []
