"""Bad input on the command line: one clear line on stderr naming the problem, exit status 2."""

import subprocess
import sys

import pytest


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "qwen15.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def one_line_error(out) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr  # no traceback
    assert lines[0].startswith("qwen15: error: ")
    return lines[0]


def test_missing_model_file(tmp_path):
    line = one_line_error(run("generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"))
    assert "nope.gguf" in line


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip file")
    line = one_line_error(run("generate", "--model", str(bad), "--prompt", "hi"))
    assert "model.gguf" in line and "not a GGUF" in line


def test_unknown_model_name():
    line = one_line_error(run("generate", "--model", "no-such-model", "--prompt", "hi"))
    assert "no-such-model" in line and "qwen2.5-coder-0.5b-instruct" in line


def test_unknown_packaged_name_for_pull():
    line = one_line_error(run("pull", "qwen9-giant"))
    assert "qwen9-giant" in line


@pytest.mark.parametrize("flag,value,message", [
    ("--max-tokens", "-1", "max_tokens"),
    ("--temperature", "-0.5", "temperature"),
    ("--top-p", "1.5", "top_p"),
])
def test_bad_sampling_values_are_refused_before_loading(flag, value, message, tmp_path):
    # A bad value is reported without loading (or failing to load) any model.
    line = one_line_error(run("generate", "--model", str(tmp_path / "absent.gguf"), "--prompt", "hi", flag, value))
    assert message in line and value in line
