"""A process that dies in native code (SIGABRT from a C++ library) leaves the Python stack in its stderr."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def test_a_native_abort_prints_where_every_thread_was(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssv2prep", "synth", str(out), "--pairs", "8", "--train-per-class", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    # videos appear once the command body runs, i.e. after the CLI's set-up
    while time.monotonic() < deadline and proc.poll() is None and not any(out.glob("**/*.webm")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGABRT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err
    # the stack names our code's frames, not only the interpreter's
    assert 'File "' in err and "ssv2prep" in err and "synth" in err
