"""The patient key check: a worker never starts with patient ids made differently from the ones already written.

A central Patient's id derives from the shared identifier and, where set, a secret (IdentityConfig). A
worker started with another secret (or with one where there was none) would take every known patient for
a changed identity (each held for review) and make a second central Patient for every person a hospital
sends for the first time. So each target's check value (IdentityConfig.key_check: the key of a number that
is no one's, which does not give the secret away) is recorded in the compacted deployment topic by the
first worker, and `cdrsync worker` refuses to start when its own differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from .config import Config
from .dlq import iso_time, resolutions
from .errors import CdrsyncError, ConfigError
from .kafkaadmin import AcknowledgedProducer

__all__ = ["check_patient_keys", "expected_checks"]


def expected_checks(config: Config) -> dict[str, str]:
    """Target → the check value of the sites routing to it (they agree: load_config checks that)."""
    checks = {}
    for site in config.sites.values():
        if site.identity is None:
            continue
        for route in site.routes:
            checks[route.target] = site.identity.key_check()
    return checks


def check_patient_keys(
    bootstrap: str, config: Config, *, wait_seconds: float = 60, report: Callable[[str], None] = print
) -> None:
    """Record each target's check value the first time; ConfigError when one differs from the recorded."""
    topic = config.topics.name("deployment")
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            recorded = resolutions(bootstrap, topic)
            break
        except Exception as error:  # the broker not up yet (a restart under a supervisor): wait as for topics
            if time.monotonic() >= deadline:
                raise CdrsyncError(f"cannot read {topic} to check the patient key: {error}") from None
            time.sleep(2)
    missing = {}
    for target, check in sorted(expected_checks(config).items()):
        key = f"patient-key-check|{target}"
        found = recorded.get(key)
        if found is None:
            missing[key] = {"check": check, "since_ms": int(time.time() * 1000)}
        elif found.get("check") != check:
            since = iso_time(int(found.get("since_ms") or 0))
            raise ConfigError(
                f"the patient ids at '{target}' were made with another patient key secret (or none) since {since}: "
                "with this one every known patient would be held for identity review and each new person "
                "become a second central Patient. Restore the secret they were made with "
                "(the variable identity.patient_key_secret_env names)"
            )
    if missing:
        producer = AcknowledgedProducer(bootstrap)
        for key, value in missing.items():
            producer.produce(topic, orjson.dumps(value), key.encode())
        producer.finish("patient key check")
        report(f"recorded how patient ids are made for {', '.join(k.split('|', 1)[1] for k in missing)}")
