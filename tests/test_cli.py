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


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--out", "{tmp}/x.jpg"], "images are written as PNG"),
    (["generate", "--prompt", "x", "--out", "{tmp}/d"], "is a folder"),
    (["bake", "--base", "tiny-sd", "--lora", "{tmp}/a.safetensors", "--format", "diffusers", "--out",
      "{tmp}/m.safetensors"], "--format diffusers writes a folder"),
    (["inspect", "{tmp}"], "is a folder; give a .safetensors file"),
    (["merge", "{tmp}/a.safetensors:abc", "--out", "{tmp}/m.safetensors"], "merge: LoRA '"),
    (["train", "--data", "{tmp}/d", "--base", "toy", "--output-dir", "{tmp}/afile"], "--output-dir"),
    (["webui", "--lora-dir", "{tmp}", "--data-root", "{tmp}/missing"], "--data-root"),
    (["webui", "--lora-dir", "{tmp}", "--port", "{port}"], "pass another --port"),
])
def test_mistakes_found_by_a_new_user_are_one_clear_line_before_any_model_loads(tmp_path, capsys, monkeypatch,
                                                                                 argv, message):
    import socket

    from sdlora import engine, models, train

    from conftest import draw_shape

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the mistake was found")

    for module in (models, engine, train):  # (each holds its own name for it)
        monkeypatch.setattr(module, "load_base", no_loading)
    (tmp_path / "d").mkdir()
    draw_shape((32, 32)).save(tmp_path / "d" / "a.png")
    (tmp_path / "afile").write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main([a.format(tmp=tmp_path, port=port) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "m.safetensors").exists() and (tmp_path / "afile").read_text() == ""


@pytest.mark.parametrize("argv, progress", [(["train"], True), (["-q", "train"], False), (["train", "-q"], False)])
def test_quiet_also_hides_the_training_progress_bar(monkeypatch, tmp_path, argv, progress):
    import sdlora.train

    seen = {}

    class Done:
        def summary(self):
            return "done"

    def spy(cfg, *, progress):
        seen["progress"] = progress
        return Done()

    monkeypatch.setattr(sdlora.train, "train", spy)
    assert main([*argv, "--data", str(tmp_path)]) == 0
    assert seen == {"progress": progress}
