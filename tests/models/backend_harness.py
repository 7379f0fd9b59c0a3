"""Test helpers for the backend tests: start `dynaplan serve` as a real subprocess on a free
loopback port, and build a tiny model that strongly prefers given tokens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`dynaplan serve --model A [--model B ...] --port P` as a subprocess (each model is served
    under its path as given)."""

    def __init__(self, *model_dirs: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.model_dirs = [str(d) for d in model_dirs]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-m", "dynaplan.cli", "serve", "--port", str(self.port)]
        for d in self.model_dirs:
            args += ["--model", d]
        args += list(extra_args)
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dynaplan serve exited early: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dynaplan serve did not become ready on port {self.port} in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


def build_eager_model(tiny_dir: Path, out: Path, favoured: dict[int, float]) -> Path:
    """A copy of the tiny model whose next-token logits are about `favoured[token]` for those
    tokens whatever the input (untied head; a constant residual direction carries the bias)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from dynaplan.models.materialize import save_model_dir

    tiny = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    config = tiny.config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 20.0  # dominates the residual stream
        model.lm_head.weight[:, 0] = 0.0
        norm_scale = config.hidden_size**0.5  # RMSNorm maps the big component to about sqrt(d)
        for token, logit in favoured.items():
            model.lm_head.weight[token, 0] = logit / norm_scale
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    save_model_dir(model, tokenizer, out, {"source": "eager-test-model", "favoured": {str(k): v for k, v in favoured.items()}})
    return out
