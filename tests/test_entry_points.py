"""Every command runs as ``python -m ...`` or a console script, and ``make test`` brings (or
names) the browser its tests need."""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from testkit import REPOSITORY_ROOT as ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_calls_a_main_that_takes_argv(script, capsys):
    module, _, function = SCRIPTS[script].partition(":")
    main = getattr(importlib.import_module(module), function)
    parameters = list(inspect.signature(main).parameters.values())
    assert parameters[0].name == "argv" and parameters[0].default is None
    assert all(p.default is not inspect.Parameter.empty for p in parameters[1:])
    assert main.__annotations__["return"] in ("int", int)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_grpc_batch_runs_as_the_documented_script_from_any_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "grpc_batch.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python clients/grpc_batch.py")


def make_browser(**variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "browser", *(f"{k}={v}" for k, v in variables.items())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_make
def test_make_test_names_the_packages_to_install_when_it_cannot(tmp_path):
    missing = tmp_path / "chromium"
    result = make_browser(CHROMIUM=str(missing), APT_GET="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"Chromium ({missing}, /usr/bin/chromedriver) is missing: the browser tests will be "
        f"skipped; to run them, install it as root: {INSTALL}"
    ]


@needs_make
def test_make_test_installs_the_browser_as_root(tmp_path):
    result = make_browser(CHROMIUM=str(tmp_path / "chromium"), APT_GET="echo apt-get")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "apt-get update -qq",
        "apt-get install -y -qq chromium chromium-driver",
    ]


@needs_make
def test_make_test_leaves_an_installed_browser_alone(tmp_path):
    present = tmp_path / "chromium"
    present.write_text("#!/bin/sh\n")
    present.chmod(0o755)
    driver = tmp_path / "chromedriver"
    shutil.copy(present, driver)
    result = make_browser(CHROMIUM=str(present), CHROMEDRIVER=str(driver), APT_GET="false")
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_browser_tests_skip_saying_what_to_install_without_chromium(tmp_path):
    missing = tmp_path / "chromium"
    # --noconftest: the module's skip mark decides before any fixture is set up, so the shared
    # fixtures (and PyTorch, which conftest.py imports) are not needed to see it.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--noconftest"]
        + [str(ROOT / "tests" / "test_browser.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VGGSERVE_CHROMIUM": str(missing)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" not in result.stdout and " error" not in result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all(f"Chromium ({missing}, " in line for line in skipped)
    assert all(INSTALL in line for line in skipped)
