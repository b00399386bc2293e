"""The molm CLI: generate streams text, info reports sizes, errors are one clear line."""

import os
import subprocess
import sys

from molm.cli import main, model_info

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_generate_streams_prompt_and_text(capsys):
    assert main(["generate", "--model", os.path.join(DATA, "molm-tiny-a"), "It was the", "--max-new-tokens", "5",
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It was the") and len(out) > len("It was the\n")


def test_info_counts_without_loading_weights():
    info = model_info(os.path.join(DATA, "molm-tiny-a"))
    assert info["layers"] == 2 and info["vocab"] == 512 and info["dtype"] == "bfloat16"
    assert info["active parameters per token"] < info["parameters"]
    assert info["file size"] == os.path.getsize(os.path.join(DATA, "molm-tiny-a", "pytorch_model.bin"))


def test_console_entry_point_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "molm.cli", "info", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("molm: error:") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
