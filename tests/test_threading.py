"""Thread settings molm chooses for the process: idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE) when molm is
imported before torch, an explicit setting wins, and nothing is changed once torch has loaded OpenMP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT_POLICY = "import os; {first}; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(first: str, env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    code = PRINT_POLICY.format(first=first)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(
    "first, env_policy, expected",
    [
        ("import molm", None, "PASSIVE"),
        ("import molm", "ACTIVE", "ACTIVE"),
        ("import torch; import molm", None, "None"),
    ],
)
def test_openmp_wait_policy(first, env_policy, expected):
    assert _policy(first, env_policy).strip() == expected
