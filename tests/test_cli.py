"""The molm CLI: generate streams text, info reports sizes, errors are one clear line."""

import functools
import json
import os
import re
import select
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import molm
import molm.cli as cli
from molm.cli import main, model_info

from test_train import tiny_config

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_generate_streams_prompt_and_text(capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                os.path.join(DATA, "molm-tiny-a"),
                "It was the",
                "--max-new-tokens",
                "5",
                "--dtype",
                "float32",
                "--greedy",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("It was the") and len(out) > len("It was the\n")


def test_info_counts_without_loading_weights():
    info = model_info(os.path.join(DATA, "molm-tiny-a"))
    assert info["layers"] == 2 and info["vocab"] == 512 and info["dtype"] == "bfloat16"
    assert info["active parameters per token"] < info["parameters"]
    assert info["file size"] == os.path.getsize(os.path.join(DATA, "molm-tiny-a", "pytorch_model.bin"))


def test_console_entry_point_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "molm.cli", "info", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("molm: error:") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# --- a new user's first commands -----------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(DATA, "molm-tiny-a")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stop_reads_backslash_escapes(capsys):
    """`--stop "\\n\\n"` (as typed in a shell: backslash, n) stops at a blank line."""
    prompt = "KING."
    model = molm.load(cli.DEFAULT_MODEL, dtype=torch.float32)
    full = molm.generate(model, prompt, max_new_tokens=40)
    assert "\n\n" in full  # otherwise this test could not tell the difference
    code, out, _ = run_cli(
        capsys,
        "generate",
        prompt,
        "--stop",
        "\\n\\n",
        "--max-new-tokens",
        "40",
        "--dtype",
        "float32",
        "--greedy",
        "--repetition-penalty",
        "1",
    )
    assert code == 0
    assert out == prompt + full[: full.index("\n\n")] + "\n"


@pytest.mark.parametrize(
    "typed,meant",
    [
        ("\\n\\n", "\n\n"),
        ("a\\tb", "a\tb"),
        ("\\r\\n", "\r\n"),
        ("\\\\n", "\\n"),
        ("\\x", "\\x"),
        ("plain", "plain"),
        ("é\\n", "é\n"),
    ],
)
def test_unescape(typed, meant):
    assert cli.unescape(typed) == meant


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--max-new-tokens", "-1", "--max-new-tokens must be >= 0"),
        ("--temperature", "-0.5", "--temperature must be >= 0"),
        ("--top-k", "0", "--top-k must be >= 1"),
        ("--top-p", "1.5", "--top-p must be in (0, 1]"),
        ("--repetition-penalty", "0", "--repetition-penalty must be > 0 (1 = off)"),
        ("--repetition-penalty", "-1.1", "--repetition-penalty must be > 0 (1 = off)"),
        ("--no-repeat-ngram-size", "-1", "--no-repeat-ngram-size must be >= 0"),
    ],
)
def test_bad_generate_flags_are_named_and_nothing_is_printed(capsys, flag, value, message):
    code, out, err = run_cli(capsys, "generate", "--model", TINY, "It was the", flag, value)
    assert code == 1 and out == ""  # the prompt is not echoed before the error
    assert err.strip() == f"molm: error: {message}, got {value}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["It was", "--greedy", "--temperature", "0.7"],
            "--greedy and --temperature 0.7 contradict each other: --greedy means --temperature 0",
        ),
        (["-i", "It was"], "-i reads the prompts from stdin, one a line: drop the prompt argument"),
        ([], "the prompt is empty: give some text to continue (or -i to read prompts from stdin)"),
    ],
)
def test_contradicting_generate_flags_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "generate", "--model", TINY, *argv)
    assert code == 1 and out == "" and err == f"molm: error: {message}\n"


CLI_SAMPLING = dict(temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=0)  # what --help promises


def test_generate_samples_by_default_from_a_fixed_seed(capsys):
    prompt = "It was the"
    model = molm.load(TINY, dtype=torch.float32)
    sampled = molm.generate(model, prompt, max_new_tokens=12, **CLI_SAMPLING)
    assert sampled != molm.generate(model, prompt, max_new_tokens=12, repetition_penalty=1.1)  # not greedy
    for _ in range(2):  # the same command gives the same text
        code, out, _ = run_cli(
            capsys, "generate", "--model", TINY, prompt, "--max-new-tokens", "12", "--dtype", "float32"
        )
        assert code == 0 and out == prompt + sampled + "\n"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("temperature 0.8", "top-p 0.95", "repetition penalty 1.1", "from seed 0", "(default: 0,"):
        assert default in help_text


@pytest.mark.parametrize("flags", [["--greedy"], ["--temperature", "0"], ["--greedy", "--temperature", "0"]])
def test_greedy_flags_pick_the_most_likely_token(capsys, flags):
    prompt = "It was the"
    model = molm.load(TINY, dtype=torch.float32)
    for penalty in ("1.1", "1"):  # the default penalty applies to greedy decoding too; 1 turns it off
        greedy = molm.generate(model, prompt, max_new_tokens=12, repetition_penalty=float(penalty))
        argv = ["--repetition-penalty", penalty] if penalty == "1" else []
        code, out, _ = run_cli(
            capsys,
            "generate",
            "--model",
            TINY,
            prompt,
            "--max-new-tokens",
            "12",
            "--dtype",
            "float32",
            "--seed",
            "5",
            *flags,
            *argv,
        )
        assert code == 0 and out == prompt + greedy + "\n"


def test_penalty_flags_reach_generation(capsys):
    prompt = "To be, or not to be"  # the default model loops on this one when it decodes greedily
    model = molm.load(cli.DEFAULT_MODEL, dtype=torch.float32)
    for penalty, n in (("1.5", "0"), ("1", "3")):
        expected = molm.generate(
            model, prompt, max_new_tokens=40, repetition_penalty=float(penalty), no_repeat_ngram_size=int(n)
        )
        assert expected != molm.generate(model, prompt, max_new_tokens=40, repetition_penalty=1.1)
        code, out, _ = run_cli(
            capsys,
            "generate",
            prompt,
            "--max-new-tokens",
            "40",
            "--dtype",
            "float32",
            "--greedy",
            "--repetition-penalty",
            penalty,
            "--no-repeat-ngram-size",
            n,
        )
        assert code == 0 and out == prompt + expected + "\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(capsys):
    code, out, err = run_cli(capsys, "generate", "--model", TINY, "It was the", "--device", "cuda")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("molm: error: --device cuda: CUDA is not available")


def test_top_p_alone_samples_at_the_default_temperature(capsys):
    prompt = "It was the"
    model = molm.load(TINY, dtype=torch.float32)
    sampled = molm.generate(model, prompt, max_new_tokens=8, **{**CLI_SAMPLING, "top_p": 0.5})
    assert sampled != molm.generate(model, prompt, max_new_tokens=8, **CLI_SAMPLING)  # top-p 0.5 shows here
    code, out, _ = run_cli(
        capsys, "generate", "--model", TINY, prompt, "--top-p", "0.5", "--max-new-tokens", "8", "--dtype", "float32"
    )
    assert code == 0 and out == prompt + sampled + "\n"


@pytest.mark.parametrize("greedy", [["--temperature", "0"], ["--greedy"]])
def test_top_k_with_explicit_greedy_warns(capsys, greedy):
    with pytest.warns(UserWarning, match="--top-k / --top-p have no effect with --greedy / --temperature 0"):
        code, out, err = run_cli(
            capsys,
            "generate",
            "--model",
            TINY,
            "It was the",
            "--top-k",
            "5",
            *greedy,
            "--max-new-tokens",
            "4",
            "--dtype",
            "float32",
        )
    assert code == 0


def test_eval_tasks_without_lm_eval_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm_eval were not installed
    monkeypatch.delitem(sys.modules, "molm.lm_eval", raising=False)
    code, _, err = run_cli(capsys, "eval", "--model", TINY, "--tasks", "molm_local")
    assert code == 1
    assert err.strip() == (
        "molm: error: molm eval --tasks needs lm-evaluation-harness, which is not installed: pip install 'molm[eval]'"
    )


def test_closed_stdout_ends_quietly():
    """`molm generate ... | head -1`: the reader is gone; no traceback, a non-zero exit (128 + SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "molm.cli", "generate", "--model", TINY, "It was the", "--max-new-tokens", "4"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    def user_error(args):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", user_error)
    code, _, err = run_cli(capsys, "info", "somewhere")
    assert code == 1 and err == "molm: error: first line second line\n"
    for argv in (["--debug", "info", "x"], ["info", "x", "--debug"]):  # --debug shows the traceback of anything
        with pytest.raises(ValueError, match="first line"):
            main(argv)

    def bug(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "cmd_info", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):  # not swallowed into one line
        main(["info", "somewhere"])


def test_bug_in_a_subprocess_shows_a_traceback(tmp_path):
    script = (
        "import sys, molm.cli as c\n"
        "def bug(args): raise RuntimeError('an internal bug')\n"
        "c.cmd_info = bug\nsys.exit(c.main(['info', 'x']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: an internal bug" in result.stderr


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("fmt", ["pickle", "safetensors"])
def test_info_reports_a_truncated_checkpoint(tmp_path, capsys, fmt):
    if fmt == "pickle":
        directory = _copy(TINY, tmp_path / "m")
        weights = os.path.join(directory, "pytorch_model.bin")
    else:
        directory = str(tmp_path / "m")
        molm.load(TINY).save_pretrained(directory)
        weights = os.path.join(directory, "model.safetensors")
    assert model_info(directory)["integrity"] == "ok"
    assert main(["info", directory]) == 0
    capsys.readouterr()
    with open(weights, "r+b") as f:  # an interrupted download or copy
        f.truncate(os.path.getsize(weights) - 1000)
    problem = model_info(directory)["integrity"]
    assert problem.startswith(os.path.basename(weights) + ": truncated")
    code, out, err = run_cli(capsys, "info", directory)
    assert code == 1 and "integrity: " + problem in out
    assert err.strip() == f"molm: error: {directory} is damaged: {problem}"


def test_safetensors_with_trailing_bytes_is_damaged(tmp_path):
    directory = str(tmp_path / "m")
    molm.load(TINY).save_pretrained(directory)
    with open(os.path.join(directory, "model.safetensors"), "ab") as f:
        f.write(b"\0" * 10)
    assert model_info(directory)["integrity"] == "model.safetensors: 10 bytes more than its header describes"


def test_short_training_run_reaches_the_peak_lr(tmp_path, capsys):
    """`molm train --steps 10` with the default warmup: the lr reaches --lr, then decays."""
    cfg = tiny_config()
    cfg.save_pretrained(tmp_path / "cfg")
    np.save(tmp_path / "tokens.npy", np.arange(2000) % 64)
    assert (
        main(
            [
                "train",
                str(tmp_path / "tokens.npy"),
                "--config",
                str(tmp_path / "cfg" / "config.json"),
                "--out",
                str(tmp_path / "out"),
                "--steps",
                "10",
                "--lr",
                "0.002",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--eval-every",
                "0",
            ]
        )
        == 0
    )
    with open(tmp_path / "out" / "log.jsonl", encoding="utf-8") as f:
        lrs = [json.loads(line)["lr"] for line in f]
    assert len(lrs) == 10 and max(lrs) == pytest.approx(0.002)
    assert lrs[-1] < lrs[0] or lrs[0] < max(lrs)  # a schedule, not a constant


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_quick_start_test_command_runs_in_the_venv_and_ci_runs_it_verbatim():
    blocks = re.findall(r"```bash\n(.*?)```", readme(), flags=re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert test.startswith(". .venv/bin/activate && ")  # a new shell: the venv of the first command
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert test in f.read().splitlines()


def test_readme_python_api_snippet_runs(capsys):
    """The README's Python API example, on the small test model instead of the 4B one."""
    section = readme().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert '"path/to/MoLM-350M-4B"' in code
    code = code.replace('"path/to/MoLM-350M-4B"', repr(TINY))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    ids = namespace["input_ids"]
    assert out.logits.shape == (*ids.shape, 512) and out.loss is not None and out.past_key_values.length == ids.shape[1]


# --- installing ------------------------------------------------------------------------------------------------------
def test_setup_without_torch_says_how_to_install(tmp_path):
    """pip's default isolated build has no torch: say what to do, not only "No module named 'torch'"."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no_torch")}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "setup.py"), "--name"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "install torch first" in result.stderr and "pip install --no-build-isolation -e ." in result.stderr


def test_setup_with_cuda_torch_but_no_toolkit_builds_the_cpu_kernels(monkeypatch, capsys):
    import runpy

    from torch.utils import cpp_extension

    monkeypatch.delenv("MOLM_CPU_ONLY", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build of torch ...
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # ... on a machine without nvcc
    setup_py = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="molm_setup")  # defines, does not build
    extension = setup_py["_extension"]()
    assert extension.name == "molm._C"
    assert extension.sources and not any(src.endswith(".cu") for src in extension.sources)
    assert "-DMOLM_WITH_CUDA" not in str(extension.extra_compile_args)
    err = capsys.readouterr().err
    assert "WARNING" in err and "building the CPU kernels only" in err and "CUDA_HOME" in err


# --- molm generate -i ------------------------------------------------------------------------------------------------


def _cli_process(*argv, stdin=subprocess.PIPE):
    """`molm generate ARGV` in a child that takes Ctrl-C (SIGINT) as an interactive shell would deliver it."""
    return subprocess.Popen(
        [sys.executable, "-m", "molm.cli", "generate", *argv],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _read_until(stream, seen: bytes, done, timeout: float = 120.0) -> bytes:
    """Read what `stream` has until done(everything read so far) holds (the timeout only guards a hang)."""
    while not done(seen):
        ready, _, _ = select.select([stream], [], [], timeout)
        chunk = os.read(stream.fileno(), 4096) if ready else b""
        if not chunk:
            raise AssertionError(f"the output stopped after {seen!r}")
        seen += chunk
    return seen


@functools.cache
def _default_model():
    return molm.load(cli.DEFAULT_MODEL)  # as `molm generate` loads it


def _continuation(prompt: str, seed: int, max_new_tokens: int) -> str:
    return molm.generate(_default_model(), prompt, max_new_tokens=max_new_tokens, **{**CLI_SAMPLING, "seed": seed})


def test_interactive_reads_prompts_from_a_pipe():
    """`printf 'ROMEO.\\nJULIET.\\n' | molm generate -i`: one output per line, no prompt marker, exit at EOF.
    Blank lines are skipped; the n-th prompt samples from seed + n, so a repeated prompt gets a fresh text."""
    result = subprocess.run(
        [sys.executable, "-m", "molm.cli", "generate", "-i", "--max-new-tokens", "8"],
        input="ROMEO.\nJULIET.\n\nROMEO.\n",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stderr == ""
    expected = [(p, _continuation(p, seed, 8)) for seed, p in enumerate(["ROMEO.", "JULIET.", "ROMEO."])]
    assert expected[0][1] != expected[2][1]
    assert result.stdout == "".join(p + text + "\n" for p, text in expected)


def test_interactive_ctrl_c_stops_the_generation_not_the_program():
    proc = _cli_process("-i", "--max-new-tokens", "5000")
    try:
        proc.stdin.write(b"ROMEO.\n")
        proc.stdin.flush()
        out = _read_until(proc.stdout, b"", lambda seen: len(seen) > 40)  # it is generating
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"JULIET.\n")
        proc.stdin.flush()
        out = _read_until(proc.stdout, out, lambda seen: b"\nJULIET." in seen and len(seen.split(b"\nJULIET.")[1]) > 40)
        proc.send_signal(signal.SIGINT)
        proc.stdin.close()  # end of input
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and b"Traceback" not in err
    first, second = (out + rest).decode().split("\nJULIET.")
    assert second.endswith("\n")  # the second generation was cut too, and the program ended at EOF
    text = first[len("ROMEO.") :]
    assert first.startswith("ROMEO.") and text
    full = ""
    for piece in molm.generate(_default_model(), "ROMEO.", max_new_tokens=5000, stream=True, **CLI_SAMPLING):
        full += piece
        if len(full) > len(text) + 10:
            break
    assert full.startswith(text)  # what was printed is the start of the uninterrupted text


def test_interactive_on_a_terminal_shows_a_prompt_marker():
    import pty

    controller, terminal = pty.openpty()
    proc = _cli_process("-i", "--max-new-tokens", "8", stdin=terminal)
    os.close(terminal)
    try:
        os.write(controller, b"ROMEO.\n\x04")  # a line, then Ctrl-D on an empty line: end of input
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        os.close(controller)
    assert proc.returncode == 0 and err == b""
    assert out.decode() == "> " + _continuation("ROMEO.", 0, 8) + "\n> \n"  # the typed prompt is not repeated
