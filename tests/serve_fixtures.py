"""A tiny random qwen2 GGUF that carries the real Qwen2.5 tokenizer and chat template, for fast server tests.

The weights are random (2 layers, hidden 64, GQA 4/2), so generation is fast and its text is nonsense;
the tokenizer, special tokens and chat template are the real checkpoint's, so prompts, stop ids, tool
templates and detokenizing behave as with the real model.
"""

from __future__ import annotations

from pathlib import Path

from gguf_fixtures import random_state_dict, tiny_config, write_tiny_gguf

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.bos_token_id", "tokenizer.chat_template")


def write_tiny_chat_gguf(path: Path, real_gguf: Path, context: int = 2048, seed: int = 0, qtype=None) -> Path:
    from qwen15.weights.gguf import open_gguf, read_metadata

    meta = read_metadata(open_gguf(real_gguf))
    config = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]), max_position_embeddings=context,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, rope_theta=1e6)
    state = random_state_dict(config, seed=seed)
    state["model.embed_tokens.weight"] *= 4  # peaked logits: greedy ties (and fp-order flips) are unlikely
    kw = {"qtype": qtype} if qtype is not None else {}  # e.g. Q8_0: compact weights, the C kernels and layers
    write_tiny_gguf(path, config, state, metadata={k: meta[k] for k in TOKENIZER_KEYS if k in meta}, **kw)
    return path


class ServerProcess:
    """A `qwen15 serve` subprocess on 127.0.0.1 and a free port; stopped with stop() (SIGTERM, then kill)."""

    def __init__(self, model: Path, *extra: str, api_key: str | None = "sk-test", name: str = "tiny"):
        import os
        import socket
        import subprocess
        import sys

        import qwen15

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key, self.name = api_key, name
        src = str(Path(qwen15.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "qwen15.cli", "serve", "--model", str(model), "--port", str(self.port),
               "--served-model-name", name, "--threads", "1", *extra]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(Path(model).parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        import time

        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not come up in {timeout}s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=120)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample of /metrics (0.0 when absent)."""
        import httpx

        text = httpx.get(self.base_url + "/metrics").text
        for line in text.splitlines():
            if line.startswith(name + (("{" + labels + "}") if labels else " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout: float = 30) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
