"""`refmtp info` and the CLI's error behaviour."""
from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from refmtp.cli.main import cli


def test_info_lists_backends_and_blas():
    res = CliRunner().invoke(cli, ["info"])
    assert res.exit_code == 0, res.output
    assert "numpy" in res.output and "BLAS:" in res.output
    assert "cupy" in res.output and "numba" in res.output


def test_info_json():
    res = CliRunner().invoke(cli, ["info", "--json"])
    data = json.loads(res.output)
    assert data["backends"]["numpy"] == "ok"
    assert data["numba"]


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "refmtp.cli.main", "--version"],
                         capture_output=True, text=True, check=True)
    assert "refmtp" in out.stdout
