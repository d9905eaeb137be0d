"""The examples run as a user would run them (offline: they start the fake server themselves)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "name",
    [
        "quickstart.py",
        "thread_pool.py",
        "completion_loop_to_map.py",
        "embed_csv_column.py",
        "chat_classification.py",
        "legacy_script.py",
        "batch_job.py",
    ],
)
def test_example_runs(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert any(
        word in out.stdout for word in ("429s", "StatsSnapshot", "wrote 1000 embeddings", "500 answers, 0 failed")
    )


def test_demo_command_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "throttled_openai", "demo", "--requests", "60", "--rpm", "1200", "--latency", "0.01"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "results received       60 of 60" in out.stdout


def test_demo_rejects_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "throttled_openai", "demo", "--rpm", "-5"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "--rpm must be > 0" in out.stderr
