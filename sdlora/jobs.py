"""Training runs as child processes, for the web UI's Train tab.

One run at a time; later starts wait in a queue. Each run lives in its own folder below the outputs folder:
`NAME.toml` (the options, in the CLI's config format, so `sdlora train --config` repeats it), `logs/train.log`
(the child's stderr) and whatever `sdlora train` writes there. Progress is read back from those files, never
kept only in memory, so a page reload, a second browser tab or another server process finds a run as it is.
A crash or an out-of-memory error in training ends the child, never the server. Stop sends SIGINT, on which
`sdlora train` saves the adapter and its state at the end of the step and exits; Resume starts the run again
with `--resume latest`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import TrainConfig, dump_toml, load_toml
from .errors import ConfigError
from .logs import read_csv
from .safefiles import atomic_write_bytes
from .state import earlier_run

LOG = Path("logs") / "train.log"
START = b"--- sdlora: run started ---"  # each start's output follows one of these in the log
END = "--- sdlora: run ended ---"  # written by the server when it sees the child exit
_MARK = re.compile(r"--- sdlora: run (started|ended) --- at=(\d+(?:\.\d+)?)")
# tqdm's bar: "  1%|▏ | 3/400 [00:01<02:10,  3.05step/s, loss=1.0527, lr=1.00e-04]"
_BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)(?:,\s*([\d.]+)(step/s|s/step))?(?:,\s*loss=([\d.eE+-]+|nan|inf))?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Progress:
    name: str
    status: str  # queued, running, stopping, finished, stopped, failed, idle (a run folder nobody runs now)
    step: int = 0
    total: int = 0
    rate: float | None = None  # steps per second
    left: str = ""  # tqdm's estimate of the time left
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    adapter: Path | None = None


@dataclass
class Job:
    name: str
    folder: Path
    resume: bool = False
    proc: subprocess.Popen | None = None
    status: str = "queued"


class Jobs:
    """The runs below `outputs`: submit, stop, resume, and what each is doing."""

    def __init__(self, outputs: Path, python: str = sys.executable):
        self.outputs = Path(outputs).resolve()
        self.python = python
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def folder(self, name: str) -> Path:
        if not _NAME.fullmatch(name or ""):
            raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (at most 64), starting with a "
                              "letter or digit")
        return self.outputs / name

    def submit(self, cfg: TrainConfig) -> Job:
        """Write the run's TOML into its folder and start it, or queue it behind the running one."""
        name = cfg.name or (cfg.data.data.name if cfg.data.data else "")
        folder = self.folder(name)
        with self.lock:
            if name in self.jobs and self.jobs[name].status in ("queued", "running", "stopping"):
                raise ConfigError(f"run {name!r} is already {self.jobs[name].status}; stop it first or choose "
                                  "another name")
            # Before its TOML is replaced: an earlier run of this name keeps its settings, adapter and resume point.
            if (folder / f"{name}.safetensors").is_file():
                raise ConfigError(f"run {name!r} has finished already (its LoRA is {name}.safetensors); choose "
                                  "another name")
            if earlier_run(folder, name):
                raise ConfigError(f"run {name!r} was stopped before its end and can go on: press Resume, or choose "
                                  "another name to start afresh")
            cfg = replace(cfg, name=name, output_dir=folder)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / f"{name}.toml", dump_toml(cfg).encode())
            self.jobs[name] = job = Job(name, folder)
            self._next()
            return job

    def resume(self, name: str) -> Job:
        """Continue a stopped or crashed run from its latest state, with its own TOML."""
        folder = self.folder(name)
        if not (folder / f"{name}.toml").is_file():
            raise ConfigError(f"no run {name!r} in {self.outputs}")
        if (folder / f"{name}.safetensors").is_file():  # (refused before it is queued: its history stays 'finished')
            raise ConfigError(f"run {name!r} has finished: its LoRA is {name}.safetensors. Resume continues a stopped "
                              "or crashed run; to train more, start a new run under another name")
        with self.lock:
            if name in self.jobs and self.jobs[name].status in ("queued", "running", "stopping"):
                raise ConfigError(f"run {name!r} is already {self.jobs[name].status}")
            self.jobs[name] = job = Job(name, folder, resume=True)
            self._next()
            return job

    def stop(self, name: str) -> None:
        """A queued run leaves the queue; a running one saves at the end of its step and exits."""
        with self.lock:
            job = self.jobs.get(name)
            if job is None or job.status not in ("queued", "running"):
                raise ConfigError(f"run {name!r} is not running")
            if job.status == "queued":
                job.status = "stopped"
            else:
                job.proc.send_signal(signal.SIGINT)
                job.status = "stopping"

    def poll(self) -> None:
        """Note runs that ended and start the next queued one."""
        with self.lock:
            self._next()

    def _next(self) -> None:
        for job in self.jobs.values():
            if job.proc is not None and job.status in ("running", "stopping"):
                code = job.proc.poll()
                if code is None:
                    return  # one at a time
                job.status = {0: "finished", 130: "stopped", 143: "stopped"}.get(code, "failed")
                with open(job.folder / LOG, "a", encoding="utf-8") as f:
                    f.write(f"\n{END} at={time.time():.0f} exit={code}\n")
        for job in self.jobs.values():
            if job.status == "queued":
                self._launch(job)
                return

    def _launch(self, job: Job) -> None:
        log = job.folder / LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        args = [self.python, "-m", "sdlora", "train", "--config", str(job.folder / f"{job.name}.toml")]
        if job.resume:
            args += ["--resume", "latest"]
        with open(log, "ab") as f:  # the child keeps its own handle
            f.write(START + f" at={time.time():.0f}\n".encode())
            job.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        job.status = "running"

    def active(self) -> str:
        """The run a page that names none follows: the running one, else the last one started ("" for none)."""
        self.poll()
        running = [n for n, j in self.jobs.items() if j.status in ("running", "stopping")]
        return running[0] if running else next(reversed(self.jobs), "")

    def shutdown(self, timeout: float = 60) -> None:
        """Ask the running job to save and exit, and wait for it; queued runs stay unstarted (the server is
        stopping)."""
        with self.lock:
            for job in self.jobs.values():
                if job.status == "queued":
                    job.status = "stopped"
            running = [j for j in self.jobs.values() if j.status == "running"]
        for job in running:
            self.stop(job.name)
        for job in running:
            try:
                job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                job.proc.kill()
        self.poll()

    def progress(self, name: str) -> Progress:
        self.poll()
        folder = self.folder(name)
        job = self.jobs.get(name)
        p = Progress(name, job.status if job else "idle")
        text = _tail(folder / LOG).rpartition(START.decode())[2]
        segments = re.split(r"[\r\n]", text)
        for seg in segments:
            m = _BAR.search(seg)
            if m:
                p.step, p.total, p.left = int(m.group(1)), int(m.group(2)), m.group(4)
                if m.group(5):
                    rate = float(m.group(5))
                    p.rate = rate if m.group(6) == "step/s" else (1 / rate if rate else None)
                if m.group(7) and (not p.losses or p.losses[-1][0] != p.step):
                    p.losses.append((p.step, float(m.group(7))))
            elif seg.startswith("warning: "):
                p.warnings.append(seg.removeprefix("warning: "))
            elif seg.startswith("error: "):
                p.error = seg.removeprefix("error: ")
        if p.status != "running":
            p.losses = [(s, loss) for s, loss, _ in read_csv(folder / "logs" / "loss.csv")] or p.losses
        p.samples = sorted((folder / "samples").glob("*.png")) if (folder / "samples").is_dir() else []
        adapter = folder / f"{name}.safetensors"
        p.adapter = adapter if adapter.is_file() else None
        return p

    def history(self) -> list[dict]:
        """Every run folder below the outputs folder: its settings, final loss and adapter."""
        runs = []
        for toml in sorted(self.outputs.glob("*/*.toml")):
            folder, name = toml.parent, toml.stem
            if folder.name != name:
                continue
            try:
                settings = load_toml(toml)
            except ConfigError:
                continue
            rows = read_csv(folder / "logs" / "loss.csv")
            adapter = folder / f"{name}.safetensors"
            runs.append({"name": name, "settings": settings, "steps": rows[-1][0] if rows else 0,
                         "final_loss": rows[-1][1] if rows else None, "seconds": _seconds(folder / LOG),
                         "adapter": adapter if adapter.is_file() else None,
                         "status": self.jobs[name].status if name in self.jobs else "idle"})
        return runs

    def settings(self, name: str) -> dict:
        """A past run's options, to load back into the form."""
        return load_toml(self.folder(name) / f"{name}.toml")


def _seconds(log: Path) -> float:
    """Time spent on the run, summed over its starts: each from its start to its end (marked when the server saw
    the child exit); a start whose end was never marked counts to the log's last write if it is the last, else the
    time its progress bar last showed."""
    if not log.is_file():
        return 0.0
    text = log.read_text(encoding="utf-8", errors="replace")
    segments = text.split(START.decode())[1:]
    total = 0.0
    for i, seg in enumerate(segments):
        marks = dict(_MARK.findall(START.decode() + seg))
        if "started" not in marks:
            continue
        if "ended" in marks:
            total += float(marks["ended"]) - float(marks["started"])
        elif i == len(segments) - 1:
            total += max(0.0, log.stat().st_mtime - float(marks["started"]))
        else:
            bars = [m.group(3) for m in _BAR.finditer(seg)]
            total += _clock(bars[-1]) if bars else 0.0
    return total


def _clock(text: str) -> float:
    """tqdm's "[HH:]MM:SS" as seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _tail(path: Path, limit: int = 1 << 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - limit))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
