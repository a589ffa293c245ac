"""Training runs as child processes (the web UI's Train tab): start, queue, stop, resume, fail, history."""

from __future__ import annotations

import time

import pytest

from sdlora.config import AdapterConfig, DataConfig, TrainConfig, build_config
from sdlora.errors import ConfigError
from sdlora.jobs import Jobs
from sdlora.run import flat_config

from conftest import make_dataset


def config(data, name, steps, **kw):
    return TrainConfig(base="tiny-sd", name=name, steps=steps, save_precision="fp32", **kw,
                       data=DataConfig(data=data, resolution=64), adapter=AdapterConfig(rank=4))


def wait(jobs, name, until, timeout=240):
    deadline = time.time() + timeout
    while True:
        p = jobs.progress(name)
        if until(p):
            return p
        assert time.time() < deadline, (p.status, p.step, p.error)
        time.sleep(0.2)


@pytest.mark.slow
def test_a_run_queues_stops_resumes_and_finishes_in_its_own_folder(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    jobs, began = Jobs(tmp_path / "outputs"), time.time()
    long = jobs.submit(config(data, "long", 400))
    first = wait(jobs, "long", lambda p: p.step >= 3 and p.losses)
    assert first.status == "running" and first.total == 400 and first.rate and first.losses
    short = jobs.submit(config(data, "short", 4))
    assert short.status == "queued" and jobs.progress("short").status == "queued"  # one run at a time
    with pytest.raises(ConfigError, match="'long' is already running"):
        jobs.submit(config(data, "long", 10))
    jobs.stop("long")
    stopped = wait(jobs, "long", lambda p: p.status == "stopped")
    assert list((long.folder / "state").glob("long-step*.state.safetensors"))  # saved on the way out
    done = wait(jobs, "short", lambda p: p.status == "finished")
    assert done.step == done.total == 4 and done.adapter == tmp_path / "outputs" / "short" / "short.safetensors"
    assert [s for s, _ in done.losses] == [1, 2, 3, 4]  # from the run's loss CSV once it ended
    # the TOML in the run folder repeats the run with `sdlora train --config`
    from sdlora.config import load_toml

    again = flat_config(build_config(load_toml(short.folder / "short.toml")))
    sent = flat_config(config(data, "short", 4, output_dir=short.folder))
    fitted = {"resolution", "bucket_step"}  # train writes them back as it fitted them to the base
    assert {k: v for k, v in again.items() if k not in fitted} == {k: v for k, v in sent.items() if k not in fitted}
    jobs.resume("long")
    resumed = wait(jobs, "long", lambda p: p.status == "running" and p.step > stopped.step)
    assert resumed.total == 400
    jobs.stop("long")
    wait(jobs, "long", lambda p: p.status == "stopped")
    with pytest.raises(ConfigError, match="'short' has finished"):  # (it used to start, fail, and read 'failed')
        jobs.resume("short")
    # Start under a used name refuses before the run's TOML (its settings, which Resume uses) is replaced
    tomls = {n: (tmp_path / "outputs" / n / f"{n}.toml").read_bytes() for n in ("short", "long")}
    with pytest.raises(ConfigError, match="'short' has finished already"):
        jobs.submit(config(data, "short", 9))
    with pytest.raises(ConfigError, match="'long' was stopped before its end and can go on: press Resume"):
        jobs.submit(config(data, "long", 9))
    assert {n: (tmp_path / "outputs" / n / f"{n}.toml").read_bytes() for n in tomls} == tomls
    history = {r["name"]: r for r in jobs.history()}
    assert history["short"]["status"] == "finished"
    assert history["short"]["steps"] == 4 and history["short"]["final_loss"] > 0
    assert 0 < history["short"]["seconds"] < time.time() - began
    assert history["short"]["adapter"] == done.adapter and history["long"]["status"] == "stopped"
    assert history["long"]["seconds"] > 0  # (two starts)
    assert jobs.settings("short")["steps"] == 4


def test_a_run_that_fails_reports_its_error_and_the_next_one_starts(tmp_path):
    jobs = Jobs(tmp_path / "outputs")
    jobs.submit(config(tmp_path / "missing", "broken", 4))
    failed = wait(jobs, "broken", lambda p: p.status == "failed", timeout=120)
    assert "missing" in failed.error and failed.adapter is None
    with pytest.raises(ConfigError, match="run name '../escape'"):
        jobs.submit(config(tmp_path, "../escape", 4))
    with pytest.raises(ConfigError, match="no run 'nothing'"):
        jobs.resume("nothing")
    with pytest.raises(ConfigError, match="'broken' is not running"):
        jobs.stop("broken")


def test_the_time_a_run_took_sums_its_starts(tmp_path):
    from sdlora.jobs import END, LOG, START, _seconds

    log = tmp_path / LOG
    log.parent.mkdir()
    start = START.decode()
    log.write_text(f"{start} at=1000\n 1%| | 3/400 [00:05<02:10, 3.05step/s, loss=1.05]\n{END} at=1060 exit=130\n"
                   f"{start} at=5000\n 2%| | 8/400 [01:02:03<02:10, 3.05step/s, loss=1.05]\n"  # (its end unmarked)
                   f"{start} at=9000\n 3%| | 9/400 [00:01<02:10, 3.05step/s]\n{END} at=9030 exit=0\n")
    assert _seconds(log) == 60 + 3723 + 30
    assert _seconds(tmp_path / "none.log") == 0
