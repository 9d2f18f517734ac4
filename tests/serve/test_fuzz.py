"""Fuzz every operation from the app's own OpenAPI spec: whatever is sent, no 5xx.

Hypothesis drives schemathesis' strategies directly: schemathesis' pytest fixture loader does not
work with pytest 9 (it reads a private `_nodeid`).
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from resmemnet.serve import ServeSettings, create_app

pytestmark = pytest.mark.slow  # 20 examples per operation and mode

OPERATIONS = ["GET /healthz", "GET /v1/model", "POST /v1/explain", "POST /v1/predict"]


@pytest.fixture(scope="module")
def api_schema(tiny_model):
    app = create_app(tiny_model, ServeSettings(max_files=4, max_file_bytes=64 * 1024))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_spec_lists_every_operation(api_schema):
    assert sorted(op.ok().label for op in api_schema.get_all_operations()) == OPERATIONS


# GETs without parameters have no spec-breaking (negative) variant.
CASES = [(label, mode) for label in OPERATIONS for mode in schemathesis.GenerationMode
         if label.startswith("POST") or mode is schemathesis.GenerationMode.POSITIVE]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_server_errors(api_schema, label, mode):
    """Positive: requests that follow the spec (random bytes as files); negative: requests that break it."""
    method, path = label.split()
    operation = api_schema[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call()
        calls.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    assert calls and max(calls) < 500
