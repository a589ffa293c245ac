"""Test helper, run as a script: the real web UI over an engine whose generate blocks until a file appears.

`python blocking_studio.py PORT FOLDER` serves on 127.0.0.1:PORT; each generation appends "start" and "end" lines
to FOLDER/events.txt and waits for FOLDER/release to exist. A separate process, so Gradio's server threads and
event loops end with it.
"""

import sys
import time
from pathlib import Path

from PIL import Image

from sdlora.engine import Engine, Result
from webui.app import build_app


def main(port: int, folder: Path) -> None:
    (folder / "loras").mkdir(parents=True, exist_ok=True)
    engine = Engine("tiny-sd", folder / "loras")
    events = folder / "events.txt"

    def blocking_generate(params, blend, mode, progress=None):
        with events.open("a") as f:
            f.write("start\n")
        while not (folder / "release").exists():
            time.sleep(0.05)
        with events.open("a") as f:
            f.write("end\n")
        return Result([Image.new("RGB", (8, 8))], [1], ["a\nSteps: 1, Seed: 1"])

    engine.generate = blocking_generate
    app = build_app(engine, folder / "out")
    app.launch(server_name="127.0.0.1", server_port=port, quiet=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
