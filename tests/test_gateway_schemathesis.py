"""schemathesis against the gateway's own /openapi.json, bounded and derandomised: no request gets a 5xx."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.testing.asgi_server import LoopbackServer
from broker.testing.fake import FakeProvider
from tests.gateway_support import fake_manager, gateway_app

EXAMPLES_PER_OPERATION = 25


def test_no_operation_answers_5xx(tmp_path: Path) -> None:
    manager = fake_manager(tmp_path, FakeProvider("fast", usd_per_second=0.001))
    with LoopbackServer(gateway_app(tmp_path, manager)) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 10
        failures: list[str] = []
        statuses: list[int] = []
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            strategy = st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations))

            @settings(max_examples=EXAMPLES_PER_OPERATION * len(operations), derandomize=True, deadline=None,
                      database=None, suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=srv.url, timeout=30)
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                    f"{response.text[:200]}")

            check()
        assert not failures, "\n".join(failures[:10])
        # it really exercised the API: many requests, accepted ones and refused ones
        assert len(statuses) >= 200
        assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
