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

    python -m testkit.killed_export --every-step PRISTINE WORK NAME VERSION SOURCE_MODEL_DIR

does it for every step at once: the export runs to the end on a copy of the repository
``PRISTINE`` (``WORK/finished/repo``), then once per step on a fresh copy
(``WORK/step-N/repo``), each in a child forked from this one process (one interpreter start, not
one per step); it prints ``{"steps": N, "exit_codes": [...]}``, each child's exit code (-9 for
SIGKILL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
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


def _export(repository: Path, name: str, version: int, source: Path, at: int) -> KillSwitch:
    """Write model ``name`` into ``repository`` from ``source``, killed at step ``at``."""
    entry = read_model(source)
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
    switch = KillSwitch(at)
    switch.install()
    write_model(repository, info, version, onnx_bytes, entry.labels)
    return switch


def _in_child(run) -> int:
    """Run ``run()`` in a forked child; its exit code (negative: the signal that ended it)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to the caller's stack
        code = 1
        try:
            run()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def every_step(pristine: Path, work: Path, name: str, version: int, source: Path) -> dict:
    """See the module docstring (``--every-step``)."""
    finished = work / "finished" / "repo"
    shutil.copytree(pristine, finished)
    read_end, write_end = os.pipe()

    def to_the_end() -> None:
        steps = _export(finished, name, version, source, at=-1).count
        os.write(write_end, str(steps).encode())

    if _in_child(to_the_end) != 0:
        raise RuntimeError(f"the export into {finished} failed")
    steps = int(os.read(read_end, 64))
    codes = []
    for step in range(steps):
        repository = work / f"step-{step}" / "repo"
        shutil.copytree(pristine, repository)
        codes.append(_in_child(lambda r=repository, s=step: _export(r, name, version, source, s)))
    return {"steps": steps, "exit_codes": codes}


def main(argv: list[str] | None = None) -> int:
    """See the module docstring."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--every-step":
        pristine, work, name, version, source = args[1:]
        result = every_step(Path(pristine), Path(work), name, int(version), Path(source))
        print(json.dumps(result))
        return 0
    repository, name, version, step, source = args
    switch = _export(Path(repository), name, int(version), Path(source), int(step))
    print(json.dumps({"finished": True, "steps": switch.count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
