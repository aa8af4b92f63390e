"""Property-based fuzzing of the API from its own OpenAPI spec: no input makes the server answer 5xx."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from live_server import serving
from schemathesis import checks

ADMIN_KEY = "admin-fuzz"


@pytest.fixture(scope="module")
def live(tiny_checkpoint, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'fuzz.db'}"
    # A short context bounds the work any fuzzed request can ask for.
    with serving(tiny_checkpoint, url, max_seq_len=48, admin_key=ADMIN_KEY) as (server, store, secret, account_id):
        yield server, secret
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def api_schema(live):
    server, _ = live
    # The spec is for the admin key only (or everyone with --docs).
    return schemathesis.openapi.from_url(server.url + "/openapi.json",
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live):
    server, secret = live
    key = ADMIN_KEY if case.path.startswith("/admin") else secret
    # A valid-looking request may still be refused (400: prompt longer than the context), so the
    # checks are: no 5xx, and every answer has a declared status, content type and schema.
    case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {key}"},
                           checks=[checks.not_a_server_error, checks.status_code_conformance,
                                   checks.content_type_conformance, checks.response_schema_conformance])
