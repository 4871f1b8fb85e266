"""An export into a model repository that SIGKILLs itself at a chosen file-system step.

    python -m testkit.killed_export REPOSITORY NAME VERSION STEP SOURCE_MODEL_DIR

Runs :func:`export.repository.write_model` (what ``export/to_onnx.py`` ends with) for model
``NAME`` version ``VERSION``, with the graph, labels and parameters of the already exported
model in ``SOURCE_MODEL_DIR``; the ``STEP``-th call to a
file-system operation it makes (writing a file, fsync, rename, replace, removing the staging
folder; counted from 0) is where the process kills itself with SIGKILL. A write step writes
half of its bytes first, so the kill lands in the middle of the write. A ``STEP`` past the
last operation lets the export finish; it then prints the number of steps it took.

Nothing is mocked: the repository on disk is left exactly as a power cut or an OOM kill at
that instant would leave it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

from export.repository import ModelInfo, write_model
from inference.repository import read_model


class KillSwitch:
    """Counts file-system operations; SIGKILLs this process at operation number ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.count = 0

    def step(self, partial_write=None) -> None:
        """Count one operation; at operation ``at``, run ``partial_write`` and SIGKILL."""
        if self.count == self.at:
            if partial_write is not None:
                partial_write()
            os.kill(os.getpid(), signal.SIGKILL)
        self.count += 1

    def install(self) -> None:
        """Wrap the operations ``write_model`` uses (it calls them as ``os.*``/``Path.*``)."""
        switch = self
        write_bytes, write_text = Path.write_bytes, Path.write_text
        fsync, rename, replace, rmtree = os.fsync, os.rename, os.replace, shutil.rmtree

        def half(path: Path, data: bytes) -> None:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()

        def killing_write_bytes(self: Path, data: bytes) -> int:
            switch.step(lambda: half(self, data))
            return write_bytes(self, data)

        def killing_write_text(self: Path, text: str, *args, **kwargs) -> int:
            switch.step(lambda: half(self, text.encode()))
            return write_text(self, text, *args, **kwargs)

        def wrap(operation):
            def killing(*args, **kwargs):
                switch.step()
                return operation(*args, **kwargs)

            return killing

        Path.write_bytes, Path.write_text = killing_write_bytes, killing_write_text
        os.fsync, os.rename, os.replace = wrap(fsync), wrap(rename), wrap(replace)
        shutil.rmtree = wrap(rmtree)


def main(argv: list[str] | None = None) -> int:
    """See the module docstring."""
    repository, name, version, step, source = sys.argv[1:] if argv is None else argv
    entry = read_model(Path(source))
    info = ModelInfo(
        name=name,
        num_classes=entry.num_classes,
        mean=entry.mean,
        std=entry.std,
        min_size=entry.min_size,
        arch=entry.arch,
        precision=entry.precision,
    )
    onnx_bytes = entry.onnx_path.read_bytes()
    switch = KillSwitch(int(step))
    switch.install()
    write_model(Path(repository), info, int(version), onnx_bytes, entry.labels)
    print(json.dumps({"finished": True, "steps": switch.count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
