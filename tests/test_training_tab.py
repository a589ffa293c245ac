"""The Train tab's actions without a browser: data only from below --data-root, captions edited in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sdlora.errors import ConfigError
from sdlora.jobs import Jobs
from webui.training import Trainer

ROOT = Path(__file__).resolve().parent.parent
TRAVERSAL = ["..", "../..", "/etc", "/", "rim/../..", "rim/../../..", "..\\..", "rim\x00", "~", "outside",
             "rim/../../outside", str(ROOT)]


@pytest.fixture
def trainer(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ROOT / "datasets_example" / "rim", root / "rim")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "a.png").write_bytes((root / "rim").rglob("*.png").__next__().read_bytes())
    os.symlink(outside, root / "outside")  # a link leading out of the data root
    return Trainer(Jobs(tmp_path / "outputs"), root)


def test_only_folders_below_the_data_root_are_offered_or_accepted(trainer):
    assert trainer.folders() == ["rim/10_rimstyle"]  # (not the link leading out)
    for payload in TRAVERSAL:
        with pytest.raises(ConfigError, match="choose one of the folders below the data root"):
            trainer.images(payload)
    with pytest.raises(ConfigError, match="start the web UI with --data-root FOLDER"):
        Trainer(trainer.jobs, None).images("rim")


def test_captions_are_shown_edited_atomically_and_a_trigger_is_added_once(trainer):
    page = trainer.page("rim", 0)
    assert len(page) == 18 and all(caption for _, caption in page)
    image, caption = page[0]
    name = image.relative_to(trainer.root / "rim").as_posix()
    target = image.with_suffix(".txt")
    before = target.stat().st_ino
    trainer.save_caption("rim", name, "  café,   a new  caption ")
    assert target.read_bytes() == "café, a new caption\n".encode() and target.stat().st_ino != before
    assert not list(target.parent.glob("*.tmp*"))
    with pytest.raises(ConfigError, match="no image"):
        trainer.save_caption("rim", "../../secret/a.png", "x")
    with pytest.raises(ConfigError, match="no image"):
        trainer.save_captions("rim", [["../../secret/a.png", ""]], ["x"])
    assert trainer.add_trigger("rim", "zzstyle") == 18
    assert trainer.add_trigger("rim", "zzstyle") == 0  # already a tag everywhere
    assert target.read_text(encoding="utf-8") == "zzstyle, café, a new caption\n"
    assert (trainer.root.parent / "secret" / "a.png").is_file() and not list((trainer.root.parent / "secret").glob("*.txt"))


def test_the_preflight_report_is_the_one_train_prints(trainer):
    text = trainer.preflight("rim", {"base": "toy", "steps": 10})
    assert "18 images found, 18 used, 0 skipped" in text
    with pytest.raises(ConfigError, match="unknown option 'nonsense'"):
        trainer.preflight("rim", {"nonsense": 1})


def test_a_folder_whose_name_is_no_run_name_still_shows_its_report(trainer):
    shutil.copytree(trainer.root / "rim", trainer.root / "my photos")
    assert "18 images found, 18 used" in trainer.preflight("my photos", {"base": "toy"})
    with pytest.raises(ConfigError, match="run name 'my photos'"):  # (Start asks for a run name then)
        trainer.start("my photos", {"base": "toy"})


def test_settings_are_saved_as_a_toml_that_train_reads(trainer):
    from sdlora.config import build_config, dump_toml, load_toml

    cfg = trainer.config("rim", {"base": "toy", "steps": 7, "kind": "lokr"})
    path = trainer.save_toml("mine", dump_toml(cfg))
    assert path == trainer.jobs.outputs / "toml" / "mine.toml"
    again = build_config(load_toml(path))
    assert (again.steps, again.adapter.kind, again.data.data) == (7, "lokr", trainer.root / "rim")
    with pytest.raises(ConfigError, match="run name '../x'"):
        trainer.save_toml("../x", "")


def test_the_tab_s_toml_names_paths_absolutely_and_a_bad_upload_by_its_own_name(trainer, tmp_path):
    from webui.train_tab import Handlers
    from webui.training import form_updates, option_specs

    names = [n for n, *_ in option_specs()]
    do = Handlers(trainer, names, None, 0)
    text, _ = do.as_toml("rim", *form_updates(names, {"base": "toy", "steps": 7}))
    assert f'output_dir = "{trainer.jobs.outputs.resolve() / "rim"}"' in text and f'data = "{trainer.root / "rim"}"' in text
    upload = tmp_path / "cache" / "0123abcd" / "mine.toml"  # where Gradio keeps an uploaded file
    upload.parent.mkdir(parents=True)
    upload.write_text("bogus_key = 1\n")
    with pytest.raises(ConfigError) as e:
        do.loaded(str(upload))
    assert "mine.toml: unknown option 'bogus_key'" in str(e.value) and "0123abcd" not in str(e.value)


def test_a_page_of_captions_saves_only_what_changed_and_never_over_a_change_made_elsewhere(trainer):
    shown = [[p.relative_to(trainer.root / "rim").as_posix(), c] for p, c in trainer.page("rim", 0)]
    files = [trainer.root / "rim" / Path(n).with_suffix(".txt") for n, _ in shown]
    inodes = [f.stat().st_ino for f in files]
    edited = [c for _, c in shown] + [""] * 6  # (the grid's unused boxes)
    edited[0] = "rimstyle, edited here"
    edited[1] = shown[1][1] + "  "  # only spacing: not a change
    edited[2] = "rimstyle, edited here too"
    files[2].write_text("rimstyle, changed in another editor\n", encoding="utf-8")  # since the page was shown
    written, left = trainer.save_captions("rim", shown, edited)
    assert written == [files[0]] and left == [shown[2][0]]
    assert files[0].read_text(encoding="utf-8") == "rimstyle, edited here\n"
    assert files[2].read_text(encoding="utf-8") == "rimstyle, changed in another editor\n"
    assert [f.stat().st_ino for f in files[3:]] == inodes[3:]
    with pytest.raises(ConfigError, match="choose one of the folders"):
        trainer.save_captions("..", shown, edited)
