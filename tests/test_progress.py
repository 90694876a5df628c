"""Progress without a terminal: log lines at a bounded rate, with step / total, images/s and ETA."""

import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from specialists.progress import (
    PROGRESS_SECONDS_ENV,
    LogProgress,
    log_interval,
    progress,
    progress_bar,
)

LINE = re.compile(r"generalist: step (\d+)/(\d+) \((\d+)%\), ([\d.]+) images/s, ETA (\d+):(\d\d):(\d\d)$")


def test_training_stage_logs_progress_to_a_file(tiny_shards, tmp_path):
    """stderr to a file (no terminal): the generalist's steps appear as log lines with an ETA."""
    log_file = tmp_path / "stderr.txt"
    env = {**os.environ, PROGRESS_SECONDS_ENV: "0.05", "PYTHONPATH": str(ROOT)}
    with open(log_file, "w") as stderr:
        done = subprocess.run([sys.executable, "-m", "specialists.cli", "train-generalist", "--config",
                               str(ROOT / "configs/tiny.yaml"), "--set", f"data.shards={tiny_shards}", "--set",
                               f"run_dir={tmp_path / 'run'}"], stderr=stderr, stdout=subprocess.DEVNULL, env=env,
                              timeout=300)
    text = log_file.read_text()
    assert done.returncode == 0, text
    lines = [m for m in map(LINE.search, text.splitlines()) if m]
    assert lines, text
    total = 4 * -(-360 // 32)  # 4 epochs of 360 training images in 12 batches of up to 32
    for m in lines:
        step, of, pct = int(m[1]), int(m[2]), int(m[3])
        assert of == total and 0 < step <= total and pct == round(100 * step / total) and float(m[4]) > 0
    assert "\r" not in text  # no tqdm bar drawn into the file
    assert re.search(rf"generalist: done, step {total}/{total} in \d+:\d\d:\d\d, [\d.]+ images/s", text)


def test_lines_at_a_bounded_rate_by_a_clock(caplog):
    now = [0.0]
    bar = LogProgress(100, initial=10, desc="specialist 3", unit="step", interval=30, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="specialists.progress"):
        for _ in range(90):  # one step (64 images) per second: lines at 30, 60, 90 s
            now[0] += 1
            bar.update(1, images=64)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["specialist 3: step 40/100 (40%), 64.0 images/s, ETA 0:01:00",
                     "specialist 3: step 70/100 (70%), 64.0 images/s, ETA 0:00:30",
                     "specialist 3: step 100/100 (100%), 64.0 images/s, ETA 0:00:00",
                     "specialist 3: done, step 100/100 in 0:01:30, 64.0 images/s"]


def test_short_loops_say_nothing_and_other_processes_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="specialists.progress"):
        assert list(progress(range(5), desc="short", count_images=lambda i: 1)) == list(range(5))
        bar = progress_bar(10, main_process=False)
        bar.update(10, images=5)
        bar.close()
    assert caplog.records == []  # under the 30 s interval: no line, and no closing line
    items = [1, 2]
    assert progress(items, main_process=False) is items


@pytest.mark.parametrize("value, seconds", [("", 30.0), ("0", 0.0), ("2.5", 2.5), ("-1", 30.0), ("soon", 30.0)])
def test_interval_from_the_environment(monkeypatch, value, seconds):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, value)
    assert log_interval() == seconds
