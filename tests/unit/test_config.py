from pathlib import Path

import pytest

from pipeline.config import expand_env, load_config, load_sites, load_topics
from pipeline.errors import ConfigError
from pipeline.identity import global_patient_key
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shipped_configuration_is_valid() -> None:
    config = load_config(ROOT)
    assert {"site-a", "site-b", "central"} <= set(config.sites)
    assert config.source_topic(config.sites["site-a"]) == "cdc.site-a.fhir.resource"
    assert config.topics.partitions_of("identified") == config.topics.partitions_of("ready")


def test_env_values_and_defaults_are_expanded() -> None:
    assert expand_env("url: ${X:-http://d}", {}) == "url: http://d"
    assert expand_env("url: ${X:-http://d}", {"X": "http://e"}) == "url: http://e"
    with pytest.raises(ConfigError, match="NEEDED is not set"):
        expand_env("token: ${NEEDED}", {})


def test_unknown_resource_type_names_file_field_and_reason(tmp_path: Path) -> None:
    bad = write(tmp_path, "h.yaml", "site: h\nadapter: fhir\nresource_types: [Patient, Organisation]\n")
    with pytest.raises(ConfigError) as err:
        load_sites([bad])
    assert str(bad) in str(err.value) and "resource_types" in str(err.value) and "Organisation" in str(err.value)


def test_unknown_field_and_bad_adapter_are_reported(tmp_path: Path) -> None:
    bad = write(tmp_path, "h.yaml", "site: h\nadapter: csv\nroutez: []\n")
    with pytest.raises(ConfigError) as err:
        load_sites([bad])
    assert "field 'adapter'" in str(err.value) and "field 'routez'" in str(err.value)


def test_route_to_a_site_without_target_is_rejected(tmp_path: Path) -> None:
    text = (
        "site: h\nadapter: fhir\nsource: {database: d, schema: s, table: t, connector: c}\n"
        "identity: {shared_identifier_system: urn:x}\nroutes: [{target: nowhere}]\n"
    )
    bad = write(tmp_path, "h.yaml", text)
    with pytest.raises(ConfigError, match=r"field 'routes.0.target': 'nowhere' is not a site"):
        load_sites([bad])


def test_duplicate_site_names_are_rejected(tmp_path: Path) -> None:
    one = write(tmp_path, "a.yaml", "site: h\nadapter: fhir\n")
    two = write(tmp_path, "b.yaml", "site: h\nadapter: fhir\n")
    with pytest.raises(ConfigError, match="already declared"):
        load_sites([one, two])


def test_topics_file_must_declare_the_pipeline_topics(tmp_path: Path) -> None:
    bad = write(tmp_path, "topics.yaml", "source: {name_template: 'cdc.{site}'}\ntopics: {}\nretry_tiers: []\n")
    with pytest.raises(ConfigError) as err:
        load_topics(bad)
    assert "missing required entries" in str(err.value) or "retry_tiers" in str(err.value)


def test_invalid_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "h.yaml", "site: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sites([bad])


def test_a_site_with_routes_must_name_its_shared_identifier(tmp_path: Path) -> None:
    text = "site: h\nadapter: fhir\nsource: {database: d, schema: s, table: t, connector: c}\nroutes: [{target: x}]\n"
    bad = write(tmp_path, "h.yaml", text)
    with pytest.raises(ConfigError, match=r"identity\.shared_identifier_system"):
        load_sites([bad])


def test_a_hospital_database_of_its_own_for_write_back_and_an_empty_value_means_the_default(tmp_path: Path) -> None:
    source = "source: {database: d, schema: s, table: t, connector: c}\n"
    own = write(
        tmp_path, "own.yaml", f"site: h\nadapter: fhir\n{source}writeback: {{host: db.h.example, port: 6543}}\n"
    )
    unset = write(tmp_path, "unset.yaml", f"site: k\nadapter: fhir\n{source}writeback: {{host: '', port: ''}}\n")
    sites = load_sites([own, unset])
    assert sites["h"].writeback is not None and (sites["h"].writeback.host, sites["h"].writeback.port) == (
        "db.h.example",
        6543,
    )
    assert sites["k"].writeback is not None and (sites["k"].writeback.host, sites["k"].writeback.port) == (None, None)
    bad = write(tmp_path, "bad.yaml", f"site: x\nadapter: fhir\n{source}writeback: {{port: 70000}}\n")
    with pytest.raises(ConfigError, match=r"writeback.port"):
        load_sites([bad])


def test_a_hospital_fhir_endpoint_for_write_back_takes_its_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "source: {database: d, schema: s, table: t, connector: c}\n"
    text = (
        f"site: h\nadapter: fhir\n{source}writeback:\n  method: fhir\n  fhir_base_url: https://fhir.h.example/r4\n"
        "  auth_token: ${H_FHIR_TOKEN:-}\n  timeout_seconds: 12\n  first_write: read\n"
    )
    monkeypatch.setenv("H_FHIR_TOKEN", "s3cret")
    endpoint = load_sites([write(tmp_path, "h.yaml", text)])["h"].writeback.endpoint()  # type: ignore[union-attr]
    assert endpoint.fhir_base_url == "https://fhir.h.example/r4" and endpoint.timeout_seconds == 12
    assert endpoint.auth_token is not None and endpoint.auth_token.get_secret_value() == "s3cret"
    assert endpoint.first_write == "read" and "s3cret" not in repr(endpoint)
    monkeypatch.delenv("H_FHIR_TOKEN")
    assert load_sites([write(tmp_path, "h.yaml", text)])["h"].writeback.endpoint().auth_token is None  # type: ignore[union-attr]

    no_url = write(
        tmp_path, "n.yaml", f"site: n\nadapter: fhir\n{source}writeback: {{method: fhir, fhir_base_url: ''}}\n"
    )
    with pytest.raises(ConfigError, match=r"needs writeback.fhir_base_url"):
        load_sites([no_url])


def test_sites_routing_to_one_target_must_match_patients_by_the_same_identifier_system(tmp_path: Path) -> None:
    source = "source: {database: d, schema: s, table: t, connector: c}\n"
    central = write(tmp_path, "central.yaml", "site: central\nadapter: fhir\ntarget: {fhir_base_url: http://c/fhir}\n")

    def hospital(name: str, system: str, form: str = "as-written") -> Path:
        identity = f"{{shared_identifier_system: '{system}', shared_identifier_form: {form}}}"
        text = f"site: {name}\nadapter: fhir\n{source}identity: {identity}\n"
        return write(tmp_path, f"{name}.yaml", text + "routes: [{target: central}]\n")

    same = [central, hospital("a", "http://fhir.de/sid/gkv/kvid-10"), hospital("b", "http://fhir.de/sid/gkv/kvid-10")]
    assert set(load_sites(same)) == {"central", "a", "b"}
    old_uri = hospital("b", "http://fhir.de/NamingSystem/gkv/kvid-10")
    with pytest.raises(ConfigError, match=r"sites routing to 'central' match patients by different shared") as err:
        load_sites([central, same[1], old_uri])
    assert "http://fhir.de/NamingSystem/gkv/kvid-10" in str(err.value) and "b.yaml" in str(err.value)
    folding = hospital("b", "http://fhir.de/sid/gkv/kvid-10", "uppercase-no-spaces")
    with pytest.raises(ConfigError, match=r"kvid-10 \(uppercase-no-spaces\)") as err:
        load_sites([central, same[1], folding])
    both = hospital("a", "http://fhir.de/sid/gkv/kvid-10", "uppercase-no-spaces")
    assert set(load_sites([central, both, folding])) == {"central", "a", "b"}


def test_sites_routing_to_one_target_must_key_patients_with_the_same_secret_and_it_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "source: {database: d, schema: s, table: t, connector: c}\n"
    central = write(tmp_path, "central.yaml", "site: central\nadapter: fhir\ntarget: {fhir_base_url: http://c/fhir}\n")

    def hospital(name: str, variable: str) -> Path:
        identity = f"{{shared_identifier_system: urn:k, patient_key_secret_env: {variable}}}"
        text = f"site: {name}\nadapter: fhir\n{source}identity: {identity}\nroutes: [{{target: central}}]\n"
        return write(tmp_path, f"{name}.yaml", text)

    # read from the environment as it is, never through the YAML (a colon or a # in it changes nothing)
    monkeypatch.setenv("KEY_A", "first: secret #value")
    monkeypatch.setenv("KEY_B", "another-secret-value")
    sites = load_sites([central, hospital("a", "KEY_A"), hospital("b", "KEY_A")])
    patient = {"identifier": [{"system": "urn:k", "value": "A1"}]}
    assert sites["a"].identity.patient_key(patient) == global_patient_key("urn:k", "A1", "first: secret #value")
    assert sites["a"].identity.keyed and "first" not in repr(sites["a"])  # private: not in its repr
    with pytest.raises(ConfigError, match="patient key check") as err:
        load_sites([central, hospital("a", "KEY_A"), hospital("b", "KEY_B")])
    assert "secret-value" not in str(err.value) and "first" not in str(err.value)
    unset = load_sites([central, hospital("a", "KEY_UNSET")])
    assert not unset["a"].identity.keyed
    assert unset["a"].identity.patient_key(patient) == global_patient_key("urn:k", "A1")
