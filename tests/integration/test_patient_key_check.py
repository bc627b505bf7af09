"""A worker never starts with patient ids made differently from the ones the deployment has written."""

from __future__ import annotations

import pytest

from pipeline.config import Config, load_config
from pipeline.dlq import resolutions
from pipeline.errors import ConfigError
from pipeline.keycheck import check_patient_keys, expected_checks
from tests.conftest import ROOT
from tests.integration.conftest import SETTINGS, Worker

pytestmark = pytest.mark.integration


def test_a_patient_key_secret_set_after_ids_were_written_stops_the_worker_before_it_starts(
    worker: Worker, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The running worker recorded how this deployment's patient ids are made (no secret in the tests).
    recorded = resolutions(SETTINGS.kafka_bootstrap, config.topics.name("deployment"))
    assert recorded["patient-key-check|central"]["check"] == expected_checks(config)["central"]
    check_patient_keys(SETTINGS.kafka_bootstrap, config, wait_seconds=30)  # the same: a restart goes on

    monkeypatch.setenv("CDRSYNC_PATIENT_KEY_SECRET", "set-too-late")
    keyed = load_config(ROOT)
    with pytest.raises(ConfigError, match="made with another patient key secret") as err:
        check_patient_keys(SETTINGS.kafka_bootstrap, keyed, wait_seconds=30)
    assert "set-too-late" not in str(err.value)
    after = resolutions(SETTINGS.kafka_bootstrap, config.topics.name("deployment"))
    assert after["patient-key-check|central"] == recorded["patient-key-check|central"]  # nothing overwritten
