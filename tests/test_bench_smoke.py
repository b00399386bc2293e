"""The end-to-end benchmark's code paths (engine, dense twin, expert-load hooks) run on a tiny config on the CPU.

Numbers from this run mean nothing; the GPU run (bench/gpu_check.sh) produces the real ones."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_smoke_run_writes_every_measurement(tmp_path):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "e2e.py"),
            "--device",
            "cpu",
            "--smoke",
            "--models",
            "MoLM-350M-4B",
            "--impls",
            "extension",
            "dense",
            "--json",
            str(out),
            "--png",
            "",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    impls = {r["impl"]: r for r in result["records"]}
    assert set(impls) == {"extension", "dense"}
    for rec in impls.values():
        assert rec["paper_setting"]["throughput_tok_s"] > 0 and rec["prefill"]["tok_s"] > 0
        assert len(rec["decode"]) == 4 and all(d["tok_s"] > 0 for d in rec["decode"])
    # the dense twin has the MoE model's active parameters (within the 256-wide rounding of its MLP)
    moe, dense = impls["extension"]["active_params"], impls["dense"]["active_params"]
    assert abs(dense - moe) / moe < 0.1
    load = result["expert_load"]["MoLM-350M-4B"]
    assert len(load["attention"]) == 2 and len(load["mlp"]) == 2
    assert sum(load["mlp"][0]) == 2 * 32 * 2  # every token's k = 2 slots, counted once (batch 2 x 32 tokens)


def test_gpu_check_dry_run_plans_every_step_correctness_first(tmp_path):
    """bench/gpu_check.sh end to end without a GPU: the env step runs, the rest is recorded as planned, and the
    files the device tool brings back are written."""
    out = tmp_path / "gpu"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    correctness = ["env", "build", "check_registered", "pytest_cuda", "gpu_sanitize"]
    for mode in ([], ["--quick"], ["--no-bench"]):
        proc = subprocess.run(
            ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", *mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        steps = [s for s in summary["steps"] if s["step"] != "wheels"]  # wheels: only where .gpu-wheels/ has some
        benchmarks = ["e2e", "gpu_bench_attention", "gpu_bench_decode_profile", "gpu_bench_moe"]
        if mode == ["--no-bench"]:
            benchmarks = []
        assert [s["step"] for s in steps] == correctness + benchmarks
        assert steps[0]["rc"] == 0 and all(s.get("dry_run") for s in steps[1:])
        quick = mode == ["--quick"]
        assert summary["quick"] == int(quick) and summary["budget_s"] <= (240 if quick else 480)
        assert summary["no_bench"] == int(mode == ["--no-bench"])
        assert json.loads((out / "env.json").read_text())["torch_cuda_arch_list"] == "9.0a"
        assert (out / "results.tgz").stat().st_size > 0
    bad = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--fast"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "--fast" in bad.stderr


def test_pytest_resume_runs_the_tests_after_one_that_kills_the_process(tmp_path):
    """bench/pytest_resume.sh: a segfaulting test is named, and the tests after it still run and report."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_x.py").write_text(
        "import os, signal\n"
        "def test_before(): pass\n"
        "def test_crash(): os.kill(os.getpid(), signal.SIGSEGV)\n"
        "def test_after(): pass\n"
        "def test_fails(): assert False\n"
    )
    proc = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "bench", "pytest_resume.sh"),
            sys.executable,
            "-m",
            "pytest",
            "tests",
            "-p",
            "no:cacheprovider",
        ],
        env=dict(os.environ, LOG_PREFIX=str(tmp_path / "log")),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 99, proc.stdout[-2000:]
    assert (tmp_path / "log.crashes").read_text().count("CRASHED") == 1
    assert "tests/test_x.py::test_crash" in (tmp_path / "log.crashes").read_text()
    second = (tmp_path / "log.2.log").read_text()
    assert "test_after PASSED" in second and "test_fails FAILED" in second and "1 deselected" in second


def test_decode_profile_counts_each_layers_ops_once_per_step(tmp_path):
    """bench/gpu_bench_decode_profile.py on a tiny model on the CPU: per step, one moe_mlp and one sb_attention per
    layer, and the two LayerNorms of each layer plus the final one."""
    out = tmp_path / "profile.json"
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "gpu_bench_decode_profile.py"),
            "--device",
            "cpu",
            "--smoke",
            "--json",
            str(out),
        ],
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["records"]] == [1, 8]
    layers = 2
    for record in result["records"]:
        calls = {k["name"]: k["calls_per_step"] for k in record["kernels"]}
        assert calls["molm::moe_mlp"] == layers and calls["molm::sb_attention"] == layers
        assert calls["aten::layer_norm"] == 2 * layers + 1
        assert record["kernel_ms_per_step"] > 0 and record["eager_step_ms"] > 0
