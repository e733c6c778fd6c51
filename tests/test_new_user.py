"""What a new user trips over (issue 16), through the `qwen15` command as a subprocess.

The runs that need no model (errors found before loading) and the few on the tiny chat model start
together in one fixture: each pays for its interpreter and torch import, and they overlap.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import qwen15

SRC = str(Path(qwen15.__file__).resolve().parents[1])


def _env(**extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


def _start(*args, stdin=None, env=None):
    return subprocess.Popen([sys.executable, "-m", "qwen15.cli", *args], stdin=subprocess.PIPE if stdin is not None
                            else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or _env())


class Done:
    def __init__(self, proc, stdin=None):
        self.stdout, self.stderr = proc.communicate(stdin, timeout=300)
        self.returncode = proc.returncode


@pytest.fixture(scope="module")
def listener():
    """A socket listening on a free port of 127.0.0.1, held by this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_chat_gguf, tmp_path_factory, listener):
    tiny = str(tiny_chat_gguf)
    absent = str(tmp_path_factory.mktemp("absent") / "absent.gguf")
    empty = tmp_path_factory.mktemp("no-results")
    results = tmp_path_factory.mktemp("results")
    gen = ("generate", "--model", tiny, "--prompt", "hello", "--threads", "1")
    specs = {
        "tpu": (("generate", "--model", absent, "--prompt", "hi", "--device", "tpu"), None),
        "cuda": (("generate", "--model", absent, "--prompt", "hi", "--device", "cuda"), None),
        "threads-3": (("generate", "--model", absent, "--prompt", "hi", "--threads", "-3"), None),
        "threads0": (("generate", "--model", absent, "--prompt", "hi", "--threads", "0"), None),
        "context0": (("generate", "--model", absent, "--prompt", "hi", "--context", "0"), None),
        "context-5": (("generate", "--model", absent, "--prompt", "hi", "--context", "-5"), None),
        "max-over-context": (("generate", "--model", absent, "--prompt", "hi", "--context", "64",
                              "--max-tokens", "100"), None),
        "max-over-model": ((*gen, "--max-tokens", "100000"), None),
        "int8-gguf": (("generate", "--model", tiny, "--prompt", "hi", "--quant", "int8"), None),
        "plan-tpu": (("plan", "--model", "qwen1.5-7b", "--device", "tpu"), None),
        "plan-1gb": (("plan", "--model", "qwen1.5-7b", "--gpu-mem", "1"), None),
        "port": (("serve", "--model", absent, "--port", str(listener)), None),
        "version": (("--version",), None),
        "serve-help": (("serve", "--help"), None),
        "bench-help": (("bench", "--help"), None),
        "generate-help": (("generate", "--help"), None),
        "pull-help": (("pull", "--help"), None),
        "report-help": (("eval", "report", "--help"), None),
        "report-empty": (("eval", "report", "--results-dir", str(empty)), None),
        "chat": (("chat", "--model", tiny, "--threads", "1", "--max-tokens", "4"), "/help\n/exit\nnever sent\n"),
        # no --model: the packaged default, one HumanEval problem, a few tokens (skipped without `eval fetch` data)
        "eval-default": (("eval", "run", "--task", "humaneval", "--limit", "1", "--max-tokens", "8", "--threads", "1",
                          "--no-progress", "--results-dir", str(results)), None),
        "bench": (("bench", "--model", tiny, "--prompt-tokens", "8", "--gen-tokens", "4", "--threads", "1"), None),
    }
    procs = {name: (_start(*args, stdin=stdin), stdin) for name, (args, stdin) in specs.items()}
    # Piped into a reader that has gone (`| head`): its read end is closed before anything is written.
    pipe = {}
    for name, args in {"pipe-presets": ("presets",), "pipe-generate": (*gen, "--max-tokens", "8")}.items():
        p = subprocess.Popen([sys.executable, "-m", "qwen15.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env())
        p.stdout.close()
        pipe[name] = p
    out = {name: Done(p, stdin) for name, (p, stdin) in procs.items()}
    for name, p in pipe.items():
        p.wait(timeout=300)
        p.stderr_text = p.stderr.read().decode()
        p.stderr.close()
        out[name] = p
    out["results-dir"] = results
    return out


def one_line_error(out) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr  # no traceback
    assert lines[0].startswith("qwen15: error: ")
    return lines[0]


# ---- 2, 3: one-line errors, before loading -------------------------------------------------------------
def test_unknown_device_is_one_line(runs):
    line = one_line_error(runs["tpu"])
    assert "'tpu'" in line and "cpu or cuda" in line


def test_cuda_without_cuda_is_one_line_before_loading(runs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(runs["cuda"])  # the model file does not exist: the device was checked first
    assert "cuda" in line and "--device cpu" in line


@pytest.mark.parametrize("run,flag,value", [("threads-3", "--threads", "-3"), ("threads0", "--threads", "0"),
                                            ("context0", "--context", "0"), ("context-5", "--context", "-5")])
def test_non_positive_threads_and_context_are_refused(runs, run, flag, value):
    line = one_line_error(runs[run])
    assert f"{flag} must be >= 1, got {value}" in line


def test_max_tokens_past_the_context_is_refused(runs):
    assert "--max-tokens 100" in one_line_error(runs["max-over-context"])  # before loading: the file is absent
    line = one_line_error(runs["max-over-model"])  # after loading: the model's own window (2048)
    assert "--max-tokens 100000" in line and "2048" in line


def test_quant_int8_on_a_gguf_is_refused_with_the_alternative(runs):
    line = one_line_error(runs["int8-gguf"])
    assert "GGUF" in line and "gguf-int8" in line


def test_plan_refuses_unknown_devices_and_devices_too_small(runs):
    assert "'tpu'" in one_line_error(runs["plan-tpu"])
    line = one_line_error(runs["plan-1gb"])
    assert "does not fit on 1 GB devices" in line and "at least" in line
    needed = float(line.split("at least ")[1].split(" GB")[0])
    from qwen15.plan import make_plan

    plan = make_plan("qwen1.5-7b", gpu_mem_gb=needed + 0.1)  # what it says is needed is enough
    assert plan.devices_needed >= 1


def test_broken_pipe_exits_quietly(runs):
    for name in ("pipe-presets", "pipe-generate"):
        p = runs[name]
        assert p.stderr_text == "" and p.returncode == 141, (name, p.returncode, p.stderr_text)


# ---- 4: port in use -------------------------------------------------------------------------------------
def test_port_in_use_is_reported_before_loading_with_its_holder(runs, listener):
    line = one_line_error(runs["port"])  # the model file does not exist: the port was checked first
    assert f"port {listener}" in line and "already in use" in line
    assert f"pid {os.getpid()}" in line


# ---- 6: help ------------------------------------------------------------------------------------------------
def _help_of(text: str, flag: str) -> str:
    """The help paragraph of one option (argparse wraps it over lines)."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith(flag + " ") or l.strip() == flag
                 or l.strip().startswith(flag + ","))
    block = [lines[start]]
    for l in lines[start + 1:]:
        if l.strip().startswith("-") or not l.startswith("    "):
            break
        block.append(l)
    return " ".join(" ".join(block).split())


def test_help_shows_defaults_and_descriptions(runs):
    serve = runs["serve-help"].stdout
    for flag, default in [("--host", "127.0.0.1"), ("--port", "8000"), ("--max-batch", "16"), ("--max-queue", "64"),
                          ("--kv-tokens", "32768"), ("--log-level", "info")]:
        assert f"(default: {default})" in _help_of(serve, flag), flag
    bench = runs["bench-help"].stdout
    assert "(default: 512)" in _help_of(bench, "--prompt-tokens") and "(default: 128)" in _help_of(bench, "--gen-tokens")
    generate = runs["generate-help"].stdout
    for flag in ("--top-k", "--top-p", "--seed"):
        assert len(_help_of(generate, flag).split()) > 4, flag  # more than the flag and its metavar
    assert "Qwen/" in runs["pull-help"].stdout
    assert runs["version"].stdout.strip() == f"qwen15 {qwen15.__version__}"


def test_eval_report_results_folder_option_is_not_out(runs):
    text = runs["report-help"].stdout
    assert "--results-dir" in text and "--out " not in text and "--output" in text


# ---- 7: chat ----------------------------------------------------------------------------------------------
def test_chat_help_lists_commands_and_exit_quits(runs):
    out = runs["chat"]
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""  # nothing went to the model: /help answered locally, /exit quit before the last line
    for command in ("/reset", "/help", "/exit"):
        assert command in out.stderr


# ---- 8: eval report -----------------------------------------------------------------------------------------
def test_eval_report_without_results_says_so(runs):
    out = runs["report-empty"]
    assert out.returncode == 0 and "no results" in out.stderr
    assert "(published)" in out.stdout and "(ours)" not in out.stdout


def test_eval_report_names_the_default_model_as_the_user_knows_it(runs):
    if runs["eval-default"].returncode == 2 and "eval fetch" in runs["eval-default"].stderr:
        pytest.skip("HumanEval data not fetched")
    assert runs["eval-default"].returncode == 0, runs["eval-default"].stderr
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "eval", "report", "--results-dir",
                          str(runs["results-dir"]), "--no-published"], capture_output=True, text=True, env=_env(),
                         timeout=120)
    row = next(l for l in out.stdout.splitlines() if "(ours)" in l)
    assert row.startswith("| qwen2.5-coder-0.5b-instruct (ours) |") and "(n=1)" in row, out.stdout  # not the .gguf


def test_eval_report_cell_carries_n_and_the_users_name(tmp_path):
    result = {"task": "gsm8k", "model": "qwen2.5-coder-0.5b-instruct", "fingerprint": "abc", "template_hash": "t1",
              "shots": 4, "n": 5, "repeats": 1, "seed": 1, "headline": "accuracy",
              "metrics": {"accuracy": {"mean": 0.4, "std": 0.0}}, "runs": ["k"], "samples_files": []}
    (tmp_path / "result-gsm8k-k.json").write_text(json.dumps(result))
    out = subprocess.run([sys.executable, "-m", "qwen15.cli", "eval", "report", "--out", str(tmp_path),
                          "--no-published"], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    row = next(l for l in out.stdout.splitlines() if "(ours)" in l)
    assert row.startswith("| qwen2.5-coder-0.5b-instruct (ours) |") and "40.0 (n=5)" in row


# ---- 10: bench table ------------------------------------------------------------------------------------------
def test_bench_table_fits_its_labels_and_prints_no_none(runs):
    out = runs["bench"]
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    assert "None" not in out.stdout and len(lines) >= 8
    # Right-aligned labels, then two spaces: every value starts in the same column.
    starts = {len(l) - len(l.lstrip()) + len(l.split()[0]) for l in lines}
    assert len(starts) == 1, out.stdout
    assert all(l.split()[0].isidentifier() for l in lines)
