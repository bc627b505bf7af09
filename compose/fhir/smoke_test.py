#!/usr/bin/env python3
"""Smoke test of the local FHIR server: the behaviours the cdrsync sink relies on.

    python3 compose/fhir/smoke_test.py [BASE_URL]      (default: $FHIR_BASE_URL or http://localhost:8080/fhir)

Standard library only. Uses fresh ids on every run, so it can run again and again against the same database.
Prints one line per check and exits 1 if any check fails.
"""
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

BASE = (sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FHIR_BASE_URL", "http://localhost:8080/fhir")).rstrip("/")
FAILED = []


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + "/" + path.lstrip("/"), data=data, method=method)
    req.add_header("Accept", "application/fhir+json")
    if data is not None:
        req.add_header("Content-Type", "application/fhir+json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:  # server down, connection refused or reset, timeout
        return 0, {"issue": [{"diagnostics": f"no HTTP answer: {e}"}]}
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, {"raw": raw[:300].decode(errors="replace")}


def diagnostics(res):
    return " | ".join(i.get("diagnostics", "") for i in res.get("issue", []))


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
    if not ok:
        FAILED.append(name)


def main():
    run = uuid.uuid4().hex[:8]
    st, res = call("GET", "metadata")
    check("GET metadata -> 200, FHIR 4.0.1", st == 200 and res.get("fhirVersion") == "4.0.1",
          f"{st} {res.get('fhirVersion') or diagnostics(res)}")
    if st != 200:
        print(f"FHIR server at {BASE} is not answering; nothing else checked")
        return 1

    pid = str(uuid.uuid4())
    patient = {"resourceType": "Patient", "id": pid, "name": [{"family": "Smoke", "given": [run]}]}
    st, res = call("PUT", f"Patient/{pid}", patient)
    check("PUT Patient/<uuid> (new) -> 201, version 1", st == 201 and res.get("id") == pid and res["meta"]["versionId"] == "1", str(st))
    patient["gender"] = "unknown"
    st, res = call("PUT", f"Patient/{pid}", patient)
    check("PUT Patient/<uuid> (again) -> 200, same id, version 2", st == 200 and res.get("id") == pid and res["meta"]["versionId"] == "2", str(st))

    mixed = f"Smoke{run}x9"
    st, res = call("PUT", f"Patient/{mixed}", {"resourceType": "Patient", "id": mixed})
    check("PUT Patient/<mixed alphanumeric> -> 201", st == 201 and res.get("id") == mixed, str(st))

    st, res = call("PUT", f"Observation/obs-{run}", {
        "resourceType": "Observation", "id": f"obs-{run}", "status": "final", "code": {"text": "smoke"},
        "subject": {"reference": f"Patient/missing-{run}"}})
    check("PUT Observation -> missing Patient: 400 HAPI-1094", st == 400 and "HAPI-1094" in diagnostics(res), f"{st} {diagnostics(res)}")

    enc = f"enc-{run}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"Patient/{pid}", "resource": patient, "request": {"method": "PUT", "url": f"Patient/{pid}"}},
        {"fullUrl": f"Encounter/{enc}", "request": {"method": "PUT", "url": f"Encounter/{enc}"},
         "resource": {"resourceType": "Encounter", "id": enc, "status": "finished",
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                      "subject": {"reference": f"Patient/{pid}"}}}]}
    st, res = call("POST", "", bundle)
    statuses = [e.get("response", {}).get("status", "") for e in res.get("entry", [])]
    check("transaction Bundle (PUT Patient + PUT Encounter -> Patient) -> 200", st == 200 and len(statuses) == 2, f"{st} {statuses}")

    bad = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": f"Encounter/bad-{run}"},
         "resource": {"resourceType": "Encounter", "id": f"bad-{run}", "status": "finished", "class": {"code": "AMB"},
                      "subject": {"reference": f"Patient/missing-{run}"}}}]}
    st, res = call("POST", "", bad)
    st2, _ = call("GET", f"Encounter/bad-{run}")
    check("transaction with a missing reference -> 400, nothing stored", st == 400 and st2 == 404, f"{st} then GET {st2}")

    st, res = call("DELETE", f"Patient/{pid}")
    check("DELETE Patient still referenced by an Encounter -> 409", st == 409, f"{st} {diagnostics(res)}")
    st, _ = call("DELETE", f"Encounter/{enc}")
    check("DELETE Encounter -> 200", st == 200, str(st))
    st, _ = call("DELETE", f"Patient/{pid}")
    st2, _ = call("GET", f"Patient/{pid}")
    check("DELETE Patient -> 200, then GET -> 410", st == 200 and st2 == 410, f"{st} then GET {st2}")

    ident = urllib.parse.quote(f"urn:cdrsync:smoke|{run}", safe="")
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:cdrsync:smoke", "value": run}]}
    st, res = call("PUT", f"Patient?identifier={ident}", body)
    first = res.get("id")
    check("conditional PUT Patient?identifier=sys|val (no match) -> 201", st == 201 and bool(first), str(st))
    body["gender"] = "female"
    st, res = call("PUT", f"Patient?identifier={ident}", body)
    check("conditional PUT Patient?identifier=sys|val (match) -> 200, same id, version 2",
          st == 200 and res.get("id") == first and res["meta"]["versionId"] == "2", str(st))

    st, _ = call("DELETE", f"Patient/{mixed}")
    st2, res = call("POST", f"Patient/{mixed}/$expunge", {"resourceType": "Parameters", "parameter": [
        {"name": "expungeDeletedResources", "valueBoolean": True}]})
    st3, _ = call("GET", f"Patient/{mixed}")
    check("DELETE + $expunge -> 200, then GET -> 404", st == 200 and st2 == 200 and st3 == 404, f"{st} {st2} then GET {st3}")

    print(f"{len(FAILED)} failed" if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
