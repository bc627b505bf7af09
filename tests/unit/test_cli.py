import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [
        [],
        ["config", "check"],
        ["topics", "apply"],
        ["topics", "list"],
        ["connectors", "apply"],
        ["connectors", "status"],
        ["worker"],
        ["tap"],
        ["status"],
        ["monitor"],
        ["demo", "load"],
        ["demo", "wait"],
    ]
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0
        assert "usage: cdrsync" in capsys.readouterr().out


def test_config_check_reports_a_bad_site_file_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(ROOT / "topics.yaml", tmp_path / "topics.yaml")
    shutil.copytree(ROOT / "sites", tmp_path / "sites")
    (tmp_path / "sites" / "site-c.yaml").write_text("site: site-c\nadapter: fhir\nresource_types: [Patiant]\n")
    monkeypatch.setenv("CDRSYNC_CONFIG_ROOT", str(tmp_path))
    assert main(["config", "check"]) == 2
    err = capsys.readouterr().err
    assert "site-c.yaml" in err and "field 'resource_types'" in err and "Patiant" in err


def test_config_check_accepts_the_shipped_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check"]) == 0
    assert "site-a" in capsys.readouterr().out
