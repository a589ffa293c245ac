"""The CLI's own behaviour: global options anywhere, and every error as one line with the right exit code."""

import logging

import pytest

from sdlora import cli
from sdlora.cli import main


@pytest.mark.parametrize("argv, quiet", [
    (["inspect", "x.safetensors"], False),
    (["-q", "inspect", "x.safetensors"], True),
    (["inspect", "-q", "x.safetensors"], True),
    (["inspect", "x.safetensors", "--quiet"], True),
])
def test_quiet_works_before_and_after_the_command_name(monkeypatch, argv, quiet):
    seen = {}

    def spy(ns):  # main() builds its parser after this patch, so the command it runs is this one
        seen.update(quiet=ns.quiet, level=logging.getLogger().level)
        return 0

    monkeypatch.setattr(cli, "cmd_inspect", spy)
    assert main(argv) == 0
    assert seen == {"quiet": quiet, "level": logging.WARNING if quiet else logging.INFO}


@pytest.mark.parametrize("error, code, message", [
    (RuntimeError("tensor shapes do not match"), 1, "unexpected RuntimeError: tensor shapes do not match"),
    (KeyError("x"), 1, "run again with --debug"),
    (PermissionError(13, "Permission denied", "/out/a.png"), 2, "Permission denied: /out/a.png"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), 2, "out of memory on the GPU"),
    (MemoryError(), 2, "out of memory"),
])
def test_errors_that_are_not_sdloras_are_one_line_too(monkeypatch, capsys, error, code, message):
    def boom(ns):
        raise error

    monkeypatch.setattr(cli, "cmd_inspect", boom)
    assert main(["inspect", "x.safetensors"]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    if code == 1:  # --debug (before or after the command) shows the real traceback
        with pytest.raises(type(error)):
            main(["inspect", "x.safetensors", "--debug"])
