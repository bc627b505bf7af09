import orjson
import pytest

from pipeline.errors import ReferenceNotReadyError, RejectedByTargetError, TargetUnavailableError
from pipeline.fhirclient import _put_entry, classify_response

pytestmark = pytest.mark.unit
MISSING_REF = (
    b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing",'
    b'"diagnostics":"HAPI-1094: Resource Patient/abc not found, specified in path: Observation.subject"}]}'
)


@pytest.mark.parametrize("status", [200, 201])
def test_success(status: int) -> None:
    classify_response("PUT", status, b"{}")


@pytest.mark.parametrize("status", [404, 410])
def test_deleting_an_absent_resource_succeeds(status: int) -> None:
    classify_response("DELETE", status, b"")


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses(status: int) -> None:
    with pytest.raises(TargetUnavailableError):
        classify_response("PUT", status, b"busy", "7")


def test_retry_after_seconds_are_kept() -> None:
    with pytest.raises(TargetUnavailableError) as err:
        classify_response("PUT", 429, b"", "12")
    assert err.value.retry_after == 12


def test_missing_reference_is_not_yet_not_permanent() -> None:
    with pytest.raises(ReferenceNotReadyError, match="HAPI-1094"):
        classify_response("PUT", 400, MISSING_REF)


def test_referenced_resource_delete_conflict_is_retryable() -> None:
    with pytest.raises(ReferenceNotReadyError):
        classify_response("DELETE", 409, b'{"issue":[{"diagnostics":"HAPI-0550: referenced"}]}')


def test_validation_failure_is_permanent_with_the_diagnostics() -> None:
    body = b'{"resourceType":"OperationOutcome","issue":[{"diagnostics":"HAPI-0450: Failed to parse request body"}]}'
    with pytest.raises(RejectedByTargetError, match="HAPI-0450") as err:
        classify_response("PUT", 400, body)
    assert err.value.status == 400


def test_a_transaction_entry_carries_the_resource_unchanged_and_its_if_match() -> None:
    body = b'{"resourceType":"Observation","id":"o1","valueQuantity":{"value":70.10}}'
    entry = orjson.loads(_put_entry("Observation/o1", body, "7"))
    assert entry["request"] == {"method": "PUT", "url": "Observation/o1", "ifMatch": 'W/"7"'}
    assert orjson.dumps(entry["resource"]) == orjson.dumps(orjson.loads(body))
    assert b'"value":70.10' in _put_entry("Observation/o1", body, None)  # spliced, not re-encoded
    assert "ifMatch" not in orjson.loads(_put_entry("Observation/o1", body, None))["request"]
