"""The benchmark scripts' contracts that hold on any machine (their figures are in the docs).

Without a GPU the GPU benchmark stops at once, saying what to do, instead of failing late or
measuring the CPU by mistake; its dry run takes the same code path on the CPU (torch.compile
included) and prints the same tables; its dependency check names every missing item; its
accuracy check fails when an engine is wrong. Every benchmark shows its command line and has a
row in docs/benchmarks.md; the stalled-clients benchmark meets its own targets at a small scale.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from testkit import REPOSITORY_ROOT as ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark would run")
def test_gpu_benchmark_stops_at_once_without_cuda(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run(
        ["bash", "bench/gpu.sh", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},  # this venv, wherever it lies
    )
    assert result.returncode == 2
    assert "no CUDA device is visible" in result.stderr
    assert "--dry-run" in result.stderr  # says how to check the script here
    assert not any(out.glob("*.json"))  # nothing that looks like results


@pytest.mark.parametrize("script", ["bench/gpu.sh", "bench/cpu.sh"])
def test_benchmark_scripts_are_executable_bash_with_strict_mode(script):
    path = ROOT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # parses


def test_gpu_benchmark_usage_error_names_the_forms():
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: bench/gpu.sh OUT_DIR" in result.stderr


# --- bench/gpu.sh --dry-run: the GPU run's code path on the CPU --------------------------------

PIPELINE_COLUMNS = (
    "| model | method | batch | images/s | TFLOP/s | % of peak | vs eager | pass ms p50 "
    "| warm-up s | first pass s | recompiles | eager shapes | CUDA graphs |"
)
ACCURACY_COLUMNS = (
    "| model | method | images | score error (bound) | max abs Δp (bound) | top-1 agreement "
    "| fp32 top-1 p (min / median / max) | accuracy |"
)
HTTP_COLUMNS = "| start s | recompiles after ready | eager shapes | CUDA graphs |"
STREAM_COLUMNS = "| max abs Δp vs exact | recompiles after ready | eager shapes | CUDA graphs |"


def bench_environment() -> dict[str, str]:
    """This venv's Python for the scripts, and no deadline inherited from a caller."""
    environment = {**os.environ, "PYTHON": sys.executable}
    environment.pop("VGGSERVE_BENCH_DEADLINE", None)
    environment.pop("VGGSERVE_BENCH_DEPS_CHECKED", None)
    return environment


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """The cells of each row of the table whose header line starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One whole ``bench/gpu.sh OUT --dry-run``: the dependency check (a real torch.compile of
    x + 1 on the CPU), exports, the compiled backend, accuracy, HTTP and the streams."""
    out = tmp_path_factory.mktemp("dry-run")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "bench/gpu.sh", str(out), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=560,
        # Room for a cold compiler cache on a loaded machine, so that no step is skipped; the
        # deadline itself is tested below.
        env={**bench_environment(), "VGGSERVE_BENCH_TIMEOUT": "480"},
    )
    return result, out, time.monotonic() - started


def test_gpu_dry_run_prints_the_gpu_tables_and_passes(dry_run):
    result, out, seconds = dry_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 500  # the deadline given to gpu.sh (480 s from its start)
    report = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert data["profile"] == "dry-run" and not data["skipped"], data["skipped"]

    pipeline = table_rows(report, PIPELINE_COLUMNS)
    methods = {(row[0], row[1], row[2]) for row in pipeline}
    for model in ("vgg16", "vgg19"):
        for batch in ("1", "4"):
            assert (model, "eager bf16 (baseline)", batch) in methods
            assert (model, "torch backend bf16, compile reduce-overhead", batch) in methods
    # The other compile mode, as time allows, runs on the first model only.
    assert ("vgg16", "torch backend bf16, compile off", "4") in methods
    compiled = [r for r in data["pipeline"] if "torch backend" in r["method"]]
    # The backend's warm-up compiled every shape the timed passes run: they recompile nothing
    # and run nothing eagerly (the CPU captures no CUDA graph). Eager has nothing to count.
    for row in compiled:
        assert row["warmup_s"] > 0 and row["recompiles"] == 0, row
        assert row["eager_shapes"] == 0 and row["cuda_graphs"] == 0, row
    assert all(r["recompiles"] is None for r in data["pipeline"] if "eager" in r["method"])

    accuracy = table_rows(report, ACCURACY_COLUMNS)
    verdicts = {(row[0], row[1]): row[-1] for row in accuracy}
    assert verdicts[("vgg16", "torch backend bf16, compile reduce-overhead")] == "**PASS**"
    assert verdicts[("vgg19", "torch backend bf16, compile reduce-overhead")] == "**PASS**"
    assert verdicts[("vgg16", "eager bf16 (baseline)")] == "–"  # shown, not judged
    for row in data["accuracy"]:
        # Realistic posteriors, not the near-uniform ones of random weights (0.001 for 1000
        # classes): the last layer was scaled for a median top-1 of 0.6 on the test images.
        assert 0.3 <= row["reference_top1_posterior"]["median"] <= 0.9
        # bf16 differs from fp32, within the derived bound (a check that compares equal
        # engines could not fail).
        assert 0 < row["relative_score_error"] <= row["bounds"]["relative_score_error"]

    (http,) = table_rows(report, "| model | path |")
    assert http[0] == "vgg16" and HTTP_COLUMNS in report
    streams = table_rows(report, "| model | rescaling |")
    assert [row[1] for row in streams] == ["exact rescaling", "--shape-multiple 32"]
    assert STREAM_COLUMNS in report
    for row in data["http"] + data["stream"]:
        # Read from the server's log and its /metrics: the server's warm-up (--torch-warmup)
        # compiled every batch size it runs, and the stream's other sizes are shapes its
        # dynamic-shape compile covers, so nothing compiles or runs eagerly once it is ready.
        events = row["request_path_events"]
        assert events["recompiles"] == 0 and events["eager_shapes"] == 0, events
        assert events["cuda_graphs"] == events["cuda_graphs_after_ready"] == 0, events
    assert "vgg16 | torch backend" in result.stdout  # the table is printed too


def test_gpu_dry_run_fails_when_the_engine_is_wrong(tmp_path):
    """A last layer 50% too large changes every score by 50%: far past the bf16 bound (~0.09),
    so the run marks the row FAIL and exits 1 (optional steps skipped: budget 0)."""
    out = tmp_path / "perturbed"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            str(out),
            "--dry-run",
            "--models",
            "vgg16",
            "--budget-s",
            "0",
            "--perturb-engine",
            "0.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # The dependency check (a compile of x + 1) is the dry run's test.
        env={**bench_environment(), "VGGSERVE_BENCH_DEPS_CHECKED": "1"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "accuracy FAIL: vgg16 torch backend bf16, compile reduce-overhead" in result.stderr
    rows = table_rows((out / "results.md").read_text(), ACCURACY_COLUMNS)
    assert [row[-1] for row in rows if "torch backend" in row[1]] == ["**FAIL**"]
    data = json.loads((out / "results.json").read_text())
    (failed,) = [r for r in data["accuracy"] if r["verdict"] == "FAIL"]
    assert 0.45 < failed["relative_score_error"] < 0.55  # the 50% it was given


# --- what the run needs: the dependency check --------------------------------------------------


def check_deps(*flags: str, environment: dict[str, str] | None = None, block: str = ""):
    """``python -m bench.gpu --check-deps FLAGS``, with the module ``block`` made unimportable."""
    code = (
        "import sys\n"
        + (f"sys.modules[{block!r}] = None\n" if block else "")
        + "from bench.gpu import main\n"
        + f"sys.exit(main(['--check-deps', *{list(flags)!r}]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment or bench_environment(),
    )


def test_check_deps_names_a_missing_module_and_how_to_get_it():
    result = check_deps("--dry-run", block="fastapi")
    assert result.returncode == 3  # a Python module: bench/gpu.sh can install wheels for it
    prefix = "error: missing Python module fastapi (the HTTP front end)"
    (line,) = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert "pip install 'fastapi'" in line and "bench/gpu.sh --fetch-wheels" in line
    assert "torch.compile" not in result.stderr  # no compile while something is missing


def test_check_deps_names_a_missing_compiler(tmp_path):
    environment = {**bench_environment(), "PATH": str(tmp_path)}  # no g++, no clang++
    environment.pop("CXX", None)
    result = check_deps("--dry-run", environment=environment)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no C++ compiler (CXX, g++ or clang++ on PATH)")
    assert "apt-get install g++" in result.stderr


def imported_third_party_modules(start: list[str]) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere (functions included) in the repository's
    modules reachable from ``start``, each with the modules that import it."""
    local = {
        "bench",
        "vgg",
        "inference",
        "server",
        "export",
        "testkit",
        "tritonmodels",
        "tritonlocal",
    }
    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        base = ROOT.joinpath(*module.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if not path.is_file():
            continue  # a name imported from a module, not a module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in local:
                    parts = name.split(".")
                    todo += [".".join(parts[: i + 1]) for i in range(len(parts))]
                elif top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(module)
    return found


def test_check_deps_covers_every_module_the_run_imports():
    from bench.gpu import DEPENDENCIES

    # What the code reachable from the benchmark and its server imports but the run never
    # executes, and why.
    not_run = {
        "openvino": "--backend openvino; the run serves --backend torch",
        "psutil": "testkit.processes' resource sampling, which the run does not call",
        "torchvision": "vgg.pretrained: ImageNet names and weights; the run writes its own",
    }
    imported = imported_third_party_modules(["bench.gpu", "server.__main__", "server.main"])
    checked = {module.split(".")[0] for module, _, _ in DEPENDENCIES}
    unchecked = {
        m: sorted(users) for m, users in imported.items() if m not in checked | set(not_run)
    }
    assert not unchecked, f"add these to bench.gpu.DEPENDENCIES: {unchecked}"
    assert set(not_run) <= set(imported)  # an exemption for something no longer imported goes


def test_benchmark_export_needs_no_torchvision(tmp_path):
    """The export writes the run's own class names: torchvision's ImageNet metadata is never
    read (torchvision made unimportable here)."""
    code = (
        "import sys\n"
        "sys.modules['torchvision'] = None\n"
        "from pathlib import Path\n"
        "from bench.gpu import DRY_RUN, export_for_benchmark\n"
        f"work = Path({str(tmp_path)!r})\n"
        "export_for_benchmark(work, work / 'repo', 'vgg16', 0, DRY_RUN)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        result.stderr[-2000:] + (tmp_path / "export-vgg16.log").read_text()
    )
    labels = (tmp_path / "repo" / "vgg16" / "labels.txt").read_text().splitlines()
    assert labels[:2] == ["class_0000", "class_0001"] and len(labels) == 1000


# --- the accuracy check and the deadline -------------------------------------------------------


def fake_outputs(scores, classes_axis_scale: float = 1.0) -> list[dict]:
    """One scale's engine outputs from ``scores`` (N, C, 1, 1): the soft-max of their mean."""
    import numpy as np

    scaled = scores * classes_axis_scale
    logits = scaled.mean(axis=(2, 3))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return [{"scores": scaled, "probs": probs / probs.sum(axis=1, keepdims=True)}]


def test_accuracy_check_passes_within_its_bounds_and_fails_beyond():
    import numpy as np

    from bench.gpu import compare_accuracy

    rng = np.random.default_rng(0)
    scores = rng.normal(0, 2, (8, 10, 1, 1))  # 4 images and their flips
    same = compare_accuracy(fake_outputs(scores), fake_outputs(scores), 0.05)
    assert same["exceeded"] == [] and same["top1_agreement"] == 1.0
    # 1% larger scores: a relative error of 0.01, within 0.05, and posteriors that follow.
    close = compare_accuracy(fake_outputs(scores, 1.01), fake_outputs(scores), 0.05)
    assert close["relative_score_error"] == pytest.approx(0.01)
    assert close["exceeded"] == []
    # 30% larger: past the score bound.
    wrong = compare_accuracy(fake_outputs(scores, 1.3), fake_outputs(scores), 0.05)
    assert wrong["relative_score_error"] == pytest.approx(0.3)
    assert wrong["exceeded"][0].startswith("score error 0.3 of the largest score > 0.05")
    # Right scores, posteriors that do not follow from them (a soft-max gone wrong).
    broken = fake_outputs(scores)
    broken[0]["probs"] = np.roll(broken[0]["probs"], 1, axis=1)
    (posterior, *top1) = compare_accuracy(broken, fake_outputs(scores), 0.05)["exceeded"]
    assert posterior.startswith("max |dp|") and "more than its scores explain" in posterior


def test_budget_counts_from_the_deadline_bench_gpu_sh_sets(monkeypatch):
    from bench.gpu import DEADLINE_RESERVE_S, Budget

    monkeypatch.setenv("VGGSERVE_BENCH_DEADLINE", str(time.time() + 100))
    budget = Budget.from_environment(fallback_s=1000)
    assert 100 - DEADLINE_RESERVE_S - 5 < budget.left() <= 100 - DEADLINE_RESERVE_S
    monkeypatch.delenv("VGGSERVE_BENCH_DEADLINE")
    assert Budget.from_environment(fallback_s=1000).left() > 900


def test_recompiles_are_counted_from_torchs_logs():
    """A function compiled for one shape and called with another recompiles once (dynamic
    from then on): the count the tables show comes from the same log line."""
    code = (
        "import torch\n"
        "from bench.gpu import CompileEvents\n"
        "events = CompileEvents.install()\n"
        "double = torch.compile(lambda x: x * 2, backend='eager')\n"
        "for n in (2, 3, 4):\n"
        "    double(torch.ones(n))\n"
        "print(events.counts['recompiles'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1"]
    assert "Recompiling function" in result.stderr  # the log a server writes, counted the same


# --- every benchmark: its command, and a row in docs/benchmarks.md -----------------------------

BENCHMARKS = sorted(
    path.stem for path in (ROOT / "bench").glob("*.py") if "def main(" in path.read_text()
)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_names_its_command_and_is_listed_in_the_docs(name):
    docstring = ast.get_docstring(ast.parse((ROOT / "bench" / f"{name}.py").read_text())) or ""
    command = f"bench.{name}"
    assert command in docstring or f"bench/{name}.sh" in docstring, (
        f"bench/{name}.py: the module docstring shows no `python -m {command}` command line"
    )
    listing = (ROOT / "docs" / "benchmarks.md").read_text()
    assert f"python -m {command}`" in listing or f"bench/{name}.sh`" in listing, (
        f"docs/benchmarks.md: no row for `python -m {command}` in the table of benchmarks"
    )


# --- bench/stalled_clients.py at a small scale --------------------------------------------------


def test_stalled_clients_benchmark_meets_its_targets_at_a_small_scale(tmp_path):
    """50 stalls against --max-connections 40 and --client-timeout 2: the script's own targets
    (11 = 50 - 39 refusals, as the steady client holds one connection; 408s and closes between
    2 and 5 s; every steady request 200; nothing held after) decide its exit status."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.stalled_clients", "--sockets", "50"]
        + ["--client-timeout", "2", "--max-connections", "40", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout, "| measure | value | target | met |")
    met = {row[0]: row[3] for row in rows}
    assert met["refused at once: 503, JSON naming --max-connections, Retry-After"] == "yes"
    assert met["s from last byte to answer: min / median / max"] == "yes"
    assert "**NO**" not in met.values() and list(met.values()).count("yes") == 8, rows
