"""Synthea patients, generated once per (version, seed, clinician seed, population, reference date, history)
and cached: the same arguments always give byte-identical bundles (checked: two runs, same MD5 sums)."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["SyntheaRun", "bundles", "synthea_version"]

REPO = Path(__file__).resolve().parents[2]
POM = REPO / "compose" / "synthea" / "pom.xml"


def synthea_version(pom: Path = POM) -> str:
    """The Synthea version compose/synthea/pom.xml pins."""
    match = re.search(r"<synthea\.version>([^<]+)</synthea\.version>", pom.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{pom}: no <synthea.version>")
    return match.group(1)


@dataclass(frozen=True)
class SyntheaRun:
    """One reproducible population. `reference_date` (YYYYMMDD) fixes both the reference and the end date,
    so ages and histories do not move with the day the benchmark runs."""

    seed: int
    population: int
    clinician_seed: int = 1
    reference_date: str = "20250101"
    years_of_history: int = 5
    ages: str = "40-80"  # tumour-board patients are adults

    def key(self, version: str) -> str:
        return (
            f"synthea-{version}-s{self.seed}-cs{self.clinician_seed}-p{self.population}"
            f"-r{self.reference_date}-h{self.years_of_history}-a{self.ages}"
        )

    def arguments(self, out_dir: Path) -> list[str]:
        """Synthea's command line (main class App): FHIR R4 bundles only, no hospital or practitioner bundles."""
        return [
            "App",
            *("-s", str(self.seed), "-cs", str(self.clinician_seed), "-p", str(self.population)),
            *("-r", self.reference_date, "-e", self.reference_date, "-a", self.ages),
            f"--exporter.baseDirectory={out_dir}",
            f"--exporter.years_of_history={self.years_of_history}",
            "--exporter.fhir.export=true",
            "--exporter.hospital.fhir.export=false",
            "--exporter.practitioner.fhir.export=false",
            "--exporter.csv.export=false",
            "--generate.only_alive_patients=true",
        ]

    def generate(self, lib_dir: Path, cache_dir: Path, log: Any = print) -> Path:
        """The directory of this population's bundles, generating it first if it is not cached."""
        version = synthea_version()
        out = cache_dir / self.key(version)
        if (out / ".complete").exists():
            log(f"synthea: {self.population} patients from the cache ({out})")
            return out
        if not any(lib_dir.glob("synthea-*.jar")):
            raise RuntimeError(f"no Synthea jars in {lib_dir}: run `bash compose/native/synthea.sh install`")
        out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log(f"synthea {version}: generating {self.population} patients (seed {self.seed}) into {out}")
        command = ["java", "-Xmx2g", "-cp", f"{lib_dir}/*", *self.arguments(out)]
        with (out / "synthea.log").open("wb") as output:
            subprocess.run(command, check=True, stdout=output, stderr=subprocess.STDOUT, timeout=3600)
        found = len(bundle_paths(out))
        if found != self.population:
            raise RuntimeError(
                f"synthea wrote {found} patient bundles, not {self.population} (log: {out / 'synthea.log'})"
            )
        (out / ".complete").write_text(f"{time.monotonic() - started:.0f} s\n")
        log(f"synthea: {found} patients in {time.monotonic() - started:.0f} s")
        return out


def bundle_paths(out: Path) -> list[Path]:
    """Patient bundles, in a stable order (hospital and practitioner bundles are not exported)."""
    names = sorted((out / "fhir").glob("*.json"))
    return [p for p in names if not p.name.startswith(("hospitalInformation", "practitionerInformation"))]


def bundles(out: Path) -> list[dict[str, Any]]:
    """Every patient bundle of a generated population, parsed."""
    return [orjson.loads(path.read_bytes()) for path in bundle_paths(out)]
