"""The `imba` dispatcher: help, unknown commands and one-line errors."""

from __future__ import annotations

import pytest

from imba import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_invalid_input_prints_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("IMBA_DEBUG", raising=False)
    missing = tmp_path / "nope.jsonl"
    status = cli.main(["concepts", "count", str(missing), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert "imba concepts: error:" in err
    assert "nope.jsonl" in err
    assert "Traceback" not in err


def test_debug_keeps_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("IMBA_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["concepts", "count", str(tmp_path / "nope.jsonl"),
                  "--output", str(tmp_path / "out")])
