"""The allocator setting: kept memory really removes the page faults of repeated large allocations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ssv2prep.cli import main
from ssv2prep.errors import ConfigError
from ssv2prep.malloc import KEPT, SYSTEM, configure_malloc

PAGES_PER_BLOCK = (64 << 20) // 4096  # a 64 MiB tensor is this many 4 KiB pages

# Allocate, touch and free two 64 MiB tensors ten times, like a forward pass's activations; print the mode in
# effect and the minor page faults of each round.
_CHILD = """
import json, sys, torch
from ssv2prep.malloc import configure_malloc, minor_page_faults
mode = configure_malloc(sys.argv[1])
faults = []
for _ in range(10):
    before = minor_page_faults()
    x = torch.empty(64 << 18).fill_(1.0)
    y = x * 2
    del x, y
    faults.append(minor_page_faults() - before)
print(json.dumps({"mode": mode, "faults": faults}))
"""


def _faults_in_child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_removes_the_page_faults_of_repeated_allocations() -> None:
    kept, system = _faults_in_child(KEPT), _faults_in_child(SYSTEM)
    assert kept["mode"] == KEPT and system["mode"] == SYSTEM
    # The system allocator maps fresh pages for every 64 MiB block of every round: at least one fault per page.
    assert min(system["faults"][5:]) >= PAGES_PER_BLOCK
    # Kept: once the heap has grown (the first rounds), rounds reuse freed memory and fault (almost) never.
    assert sum(kept["faults"][:3]) >= PAGES_PER_BLOCK  # the first rounds did grow the heap
    assert min(kept["faults"][3:]) < PAGES_PER_BLOCK // 100
    assert sum(kept["faults"][3:]) < sum(system["faults"][3:]) / 4


def test_unknown_mode_is_a_config_error_and_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="unknown malloc mode 'jemalloc'"):
        configure_malloc("jemalloc")
    result = CliRunner().invoke(main, ["--malloc", "jemalloc", "bench", "--help"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "'jemalloc' is not one of 'kept', 'system'" in result.stderr


def test_the_choice_reaches_subprocess_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSV2PREP_MALLOC", "kept")  # restored after the test
    result = CliRunner().invoke(main, ["--malloc", "system", "bench", "--help"])
    assert result.exit_code == 0
    # `run` and `demo` start their stages with this environment: the stage's own --malloc default follows it
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['SSV2PREP_MALLOC'])"], capture_output=True, text=True
    )
    assert child.stdout.strip() == "system"
