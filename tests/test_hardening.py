"""Nothing lost, nothing let in: a run that diverges or is interrupted keeps what it had; odd input gets a message."""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sdlora.cli import main
from sdlora.data.scan import read_caption
from sdlora.safefiles import read_safetensors
from sdlora.state import load_state

from conftest import make_dataset

ROOT = Path(__file__).resolve().parent.parent


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2)
    args = ["-q", "train", "--data", str(data), "--resolution", "64", "--steps", "30", "--lr", "1e4",
            "--max-grad-norm", "0", "--save-every", "1", "--output-dir", str(tmp_path / "o"), "--name", "n"]
    assert main(args) == 2
    err = capsys.readouterr().err
    m = re.search(r"error: step (\d+): the loss or the gradients are not finite \(NaN or Inf\) at learning rate "
                  r"1e\+04; this step's images: img\d\.png\. The run stopped there", err)
    assert m, err
    stopped = int(m.group(1))
    last = tmp_path / "o" / f"n-step{stopped - 1:06d}.safetensors"
    assert f"the last good adapter is {last}" in err and "--resume latest" in err
    assert not (tmp_path / "o" / "n.safetensors").exists()
    assert not (tmp_path / "o" / f"n-step{stopped:06d}.safetensors").exists()
    tensors, _ = read_safetensors(last)  # checks every value is finite
    assert main(["-q", "inspect", str(last)]) == 0


def test_nan_policy_skip_passes_over_such_steps(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2)
    assert main(["train", "--data", str(data), "--resolution", "64", "--steps", "4", "--lr", "1e4",
                 "--max-grad-norm", "0", "--nan-policy", "skip", "--output-dir", str(tmp_path), "--name", "s"]) == 0
    out, err = capsys.readouterr()
    skipped = err.count("step skipped (--nan-policy skip)")
    assert skipped >= 1 and f"after 4 steps ({skipped} skipped: loss not finite)" in out
    tensors, _ = read_safetensors(tmp_path / "s.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_captions_in_unicode_with_a_byte_order_mark_are_read(tmp_path, encoding):
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE,
           "utf-32-be": codecs.BOM_UTF32_BE}.get(encoding, b"")
    (tmp_path / "a.txt").write_bytes(bom + "café, a red circle\r\nsecond line".encode(encoding))
    assert read_caption(tmp_path / "a.png") == "café, a red circle"


def test_resolution_below_the_bucket_step_is_one_line(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=1, size=(32, 32))
    assert main(["-q", "train", "--data", str(data), "--resolution", "32", "--bucket-step", "64",
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: bucket_step (64) is larger than resolution (32), so no bucket fits; pass a "
                           "--bucket-step of at most 32 (a multiple of 8)")


class Training:
    """`sdlora train` in a child process, its stderr read as it comes (tqdm's bar ends lines with \\r)."""

    def __init__(self, tmp_path: Path, *extra: str, steps: int = 400):
        data = tmp_path / "data"
        if not data.exists():
            make_dataset(data, n=2)
        self.out = tmp_path / "o"
        self.args = ["train", "--data", str(data), "--resolution", "64", "--steps", str(steps), "--rank", "4",
                     "--save-precision", "fp32", "--output-dir", str(self.out), "--name", "k", *extra]
        self.proc = subprocess.Popen([sys.executable, "-m", "sdlora", *self.args], cwd=ROOT, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.err = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while chunk := self.proc.stderr.read(1):
            self.err += chunk

    def wait_for_step(self, n: int, timeout: float = 120) -> None:
        """Until the bar shows step n or later (tqdm skips redraws when steps come fast)."""
        deadline = time.time() + timeout
        while max(map(int, re.findall(r"\b(\d+)/\d+ \[", self.err)), default=0) < n:
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                pytest.fail(f"the run ended or stalled before step {n}:\n{self.err[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.finish()

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        self.proc.stderr.close()
        return rc


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_at_the_step_boundary_and_the_run_resumes(tmp_path, sig, code):
    run = Training(tmp_path)
    run.wait_for_step(3)
    run.proc.send_signal(sig)
    assert run.finish() == code, run.err[-2000:]
    m = re.search(r"interrupted: SIG\w+: stopped after step (\d+); saved (\S+) and its state; continue with "
                  r"--resume latest", run.err)
    assert m, run.err[-2000:]
    step = int(m.group(1))
    assert Path(m.group(2)) == run.out / f"k-step{step:06d}.safetensors" and Path(m.group(2)).is_file()
    assert (run.out / "state" / f"k-step{step:06d}.state.safetensors").is_file()
    assert not (run.out / "k.safetensors").exists()
    if sig == signal.SIGINT:  # the saved state continues to the same adapter an uninterrupted run writes
        resumed = Training(tmp_path, "--resume", "latest", steps=step + 2)
        assert resumed.finish() == 0, resumed.err[-2000:]
        assert f"resumed from {run.out / 'state'}" in resumed.err
        whole = Training(tmp_path, "--output-dir", str(tmp_path / "whole"), steps=step + 2)
        assert whole.finish() == 0, whole.err[-2000:]
        a, _ = read_safetensors(run.out / "k.safetensors")
        b, _ = read_safetensors(tmp_path / "whole" / "k.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    run = Training(tmp_path, "--gradient-checkpointing", "--batch-size", "8")
    run.wait_for_step(2)
    run.proc.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while "press Ctrl-C again" not in run.err and time.time() < deadline:  # (two at once would arrive as one)
        time.sleep(0.01)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.err[-2000:]
    assert "press Ctrl-C again to stop at once" in run.err and "stopped after step" not in run.err
    assert not list(run.out.glob("k*.safetensors"))


@pytest.mark.slow
def test_kill_matrix_every_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """SIGKILL (nothing saved on the way out) at each kind of point of a run with gradient accumulation 2 and a
    checkpoint every 2 steps over 2 epochs of 5 steps: during the first checkpoint's adapter and state writes, in
    the middle of an epoch, at an epoch's end, and while the final adapter is written. Each killed run, resumed
    with --resume latest (or started again where nothing was saved), ends with the uninterrupted run's tensors."""
    common = ("--grad-accum", "2", "--save-every", "2", "--lr", "5e-3", "--flip", "--overwrite")
    whole = Training(tmp_path, *common, "--output-dir", str(tmp_path / "whole"), steps=7)
    assert whole.finish() == 0, whole.err[-2000:]
    reference, _ = read_safetensors(tmp_path / "whole" / "k.safetensors")
    for k, point in enumerate([("write", 1), ("write", 2), ("step", 3), ("step", 5), ("write", 7)]):
        out = tmp_path / f"kill{k}"
        env = {"SDLORA_KILL_AT_WRITE": str(point[1])} if point[0] == "write" else {}
        os.environ.update(env)
        try:
            run = Training(tmp_path, *common, "--output-dir", str(out), steps=7)
        finally:
            for key in env:
                del os.environ[key]
        if point[0] == "step":
            run.wait_for_step(point[1])
            run.proc.send_signal(signal.SIGKILL)
        assert run.finish() == -signal.SIGKILL, (point, run.err[-2000:])
        assert not list(out.rglob("*.tmp")) or all(p.name.startswith(".") for p in out.rglob("*.tmp"))
        resume = ("--resume", "latest") if list((out / "state").glob("*.state.safetensors")) else ()
        again = Training(tmp_path, *common, *resume, "--output-dir", str(out), steps=7)
        assert again.finish() == 0, (point, again.err[-2000:])
        tensors, _ = read_safetensors(out / "k.safetensors")
        assert tensors.keys() == reference.keys() and all(torch.equal(tensors[n], reference[n]) for n in tensors), point


def test_resume_latest_passes_over_a_damaged_state_and_a_named_one_is_an_error(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=2)
    args = ["train", "--data", str(data), "--resolution", "64", "--rank", "4", "--save-every", "2",
            "--output-dir", str(tmp_path), "--name", "d", "--overwrite"]
    assert main(["-q", *args, "--steps", "4"]) == 0
    latest = tmp_path / "state" / "d-step000004.state.safetensors"
    blob = bytearray(latest.read_bytes())
    blob[-3] ^= 0xFF  # one flipped byte in the tensor data: the file still parses
    latest.write_bytes(bytes(blob))
    capsys.readouterr()
    assert main(["-q", *args, "--steps", "4", "--resume", str(latest)]) == 2
    assert "the state is damaged (its tensors do not match the hash it was saved with)" in capsys.readouterr().err
    assert main([*args, "--steps", "5", "--resume", "latest"]) == 0
    err = capsys.readouterr().err
    assert f"--resume latest: {latest}: the state is damaged" in err and "trying the state before it" in err
    assert f"resumed from {tmp_path / 'state' / 'd-step000002.state.safetensors'} at step 2" in err


def test_a_full_disk_stops_the_run_with_a_message_and_resuming_without_it_works(tmp_path):
    """RLIMIT_FSIZE in the child (with SIGXFSZ ignored, writes fail with EFBIG as on a full disk): the final state
    (about 0.4 MB) does not fit, the adapter (0.17 MB) does."""
    import resource

    first = Training(tmp_path, "--save-every", "2", steps=2)
    assert first.finish() == 0, first.err[-2000:]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    full = subprocess.run([sys.executable, "-m", "sdlora", *first.args, "--steps", "4", "--resume", "latest", "--overwrite"], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert full.returncode == 2, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: File too large: could not write [\d,]+ bytes \(the disk or quota is full\); "
                        r"nothing was written: \S+/state/k-step000004\.state\.safetensors", last), last
    assert not list(first.out.rglob("*.tmp"))
    assert main(["-q", "inspect", str(first.out / "k.safetensors")]) == 0  # what was written is whole
    assert load_state(first.out / "state" / "k-step000002.state.safetensors")["step"] == 2
    again = Training(tmp_path, "--save-every", "2", "--resume", "latest", "--overwrite", steps=4)
    assert again.finish() == 0, again.err[-2000:]
    assert f"resumed from {first.out / 'state' / 'k-step000002.state.safetensors'} at step 2" in again.err


def test_caption_corpus_each_case_has_its_outcome(tmp_path):
    """Each odd caption file, and what scanning makes of it: used (with what text), or a warning naming it."""
    from sdlora.data import scan_folder

    from conftest import draw_shape

    d = tmp_path / "data" / "1_thing"
    d.mkdir(parents=True)
    captions = {"missing": None, "empty": b"", "bom8": codecs.BOM_UTF8 + b"a b",
                "utf16le": codecs.BOM_UTF16_LE + "a b".encode("utf-16-le"),
                "utf16be": codecs.BOM_UTF16_BE + "a b".encode("utf-16-be"), "invalid": b"a \xff\xfe\xfd b",
                "nul": b"a\x00 b", "crlf": b"a b\r\n\r\nsecond", "lines": b"\n\n  a b  \nsecond\nthird"}
    for stem, raw in captions.items():
        draw_shape().save(d / f"{stem}.png")
        if raw is not None:
            (d / f"{stem}.txt").write_bytes(raw)
    draw_shape().save(d / "twin.png")
    draw_shape().save(d / "twin.jpg")
    (d / "twin.txt").write_text("twin caption")
    (d / "orphan.txt").write_text("no image")
    report = scan_folder(tmp_path / "data", resolution=64, bucket_step=64)
    got = {Path(i.path).name: i.caption for i in report.items}
    assert got == {"missing.png": "thing", "empty.png": "", "bom8.png": "a b", "utf16le.png": "a b",
                   "utf16be.png": "a b", "nul.png": "a b", "crlf.png": "a b", "lines.png": "a b",
                   "twin.png": "twin caption", "twin.jpg": "twin caption"}
    assert [(p.name, why) for p, why in report.skipped] == [
        ("invalid.png", "caption invalid.txt is not UTF-8 (or UTF-16 with a byte-order mark) text; re-save it as UTF-8")]
    text = "\n".join(report.warnings)
    assert "1 image(s) have no caption file (missing.png); using the folder's class token" in text
    assert "1 image(s) have an empty caption file (empty.png); they train with no text" in text
    assert "several images, which share one caption file (e.g. twin.jpg and twin.png)" in text
    assert "1 caption file(s) have no image beside them (orphan.txt); they are not used" in text


def test_a_caption_longer_than_the_text_encoder_reads_is_said(tmp_path, caplog):
    from sdlora.config import AdapterConfig, DataConfig, TrainConfig
    from sdlora.train import train

    data = make_dataset(tmp_path / "data", n=1, caption="a red circle, " + ", ".join(f"w{i}" for i in range(40)))
    with caplog.at_level("WARNING", logger="sdlora"):
        train(TrainConfig(base="tiny-sd", output_dir=tmp_path / "o", steps=1, data=DataConfig(data=data, resolution=64),
                          adapter=AdapterConfig(rank=4)))
    assert re.search(r"1 caption\(s\) are longer than the text encoder's 75 tokens and are cut: img0\.png loses "
                     r"'.*w 3 9'", caplog.text), caplog.text  # (CLIP splits digits)


NUMERIC = ["steps", "epochs", "batch-size", "grad-accum", "lr", "text-encoder-lr", "embedding-lr", "embedding-steps",
           "weight-decay", "warmup-steps", "max-grad-norm", "save-every", "sample-every", "sample-steps", "seed",
           "min-snr-gamma", "noise-offset", "prior-loss-weight", "num-workers", "resolution", "bucket-step",
           "caption-dropout", "keep-tags", "rank", "alpha", "dropout"]


def test_option_corpus_every_numeric_option_at_odd_values_is_one_line(tmp_path, capsys):
    """0, negative, huge and NaN for every numeric option: accepted (the run then stops at the missing data
    folder) or refused with one line naming the option; never a traceback or an internal error."""
    missing = tmp_path / "no-such-folder"
    for option in NUMERIC:
        for value in ("0", "-1", "1e30", "nan", "inf"):
            try:
                rc = main(["-q", "train", "--data", str(missing), f"--{option}", value, "--output-dir", str(tmp_path)])
            except SystemExit as e:  # argparse: not a number of the option's type
                rc = e.code
            err = capsys.readouterr().err.strip()
            assert rc == 2 and "Traceback" not in err, (option, value, err)
            lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "sdlora train: error:"))]
            assert len(lines) == 1, (option, value, err)
            assert "data folder not found" in lines[0] or option.replace("-", "_") in lines[0] or \
                f"--{option}" in lines[0], (option, value, lines[0])
