"""base_model materialisation: a plain safetensors copy with identical logits, tokenizer, manifest."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dynaplan.models.materialize import (
    ModelSourceError,
    materialize_base,
    rebuild_plain,
    smollm2_gguf_path,
    smollm2_tokenizer_dir,
)

MESSAGES = [{"role": "system", "content": "Answer with one action."}, {"role": "user", "content": "You see a tree."}]


def _logits(model, tokenizer):
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits


def test_tiny_model_dir_has_real_tokenizer_and_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert len(tok) == 49152
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_materialize_local_dir_gives_identical_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    manifest = materialize_base(str(tiny_model_dir), out)
    assert manifest["format"] == "hf" and len(manifest["sha256"]) == 64
    assert manifest["param_count"] > 0
    assert json.loads((out / "manifest.json").read_text()) == manifest
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    copy = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(_logits(original, tok), _logits(copy, tok))
    # same source again: skipped (resumable), nothing rewritten
    mtime = os.stat(out / "model.safetensors").st_mtime_ns
    assert materialize_base(str(tiny_model_dir), out) == manifest
    assert os.stat(out / "model.safetensors").st_mtime_ns == mtime


def test_rebuild_plain_keeps_weights_and_ties(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    plain = rebuild_plain(model)
    assert plain is not model
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(model, tok), _logits(plain, tok))


def test_bad_source_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="model.base="):
        materialize_base(str(tmp_path / "nope"), tmp_path / "out")


def test_gguf_is_found_without_importing_llama_cpp():
    import sys

    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llama_cpp" not in sys.modules


def test_the_tokenizer_cache_survives_a_reinstall(tmp_path, monkeypatch):
    """A reinstall gives the GGUF a new mtime: the extracted tokenizer is found again, not
    extracted into one more cache directory per install."""
    import shutil

    import dynaplan.models.materialize as materialize

    gguf = tmp_path / "pkg" / smollm2_gguf_path().name
    gguf.parent.mkdir()
    shutil.copyfile(smollm2_gguf_path(), gguf)
    monkeypatch.setattr(materialize, "smollm2_gguf_path", lambda: gguf)
    first = smollm2_tokenizer_dir(tmp_path / "cache")
    os.utime(gguf, (gguf.stat().st_atime + 3600, gguf.stat().st_mtime + 3600))
    assert smollm2_tokenizer_dir(tmp_path / "cache") == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]
    assert (first / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_smollm2_gguf_materialises_with_identical_logits(tmp_path):
    """The real path (about a minute): GGUF -> rebuilt plain model -> safetensors -> reload."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynaplan.models.materialize import load_source_model

    out = tmp_path / "base"
    manifest = materialize_base("smollm2", out)
    assert manifest["source"] == "smollm2" and manifest["param_count"] == 134_515_008
    gguf_model, _, info = load_source_model("smollm2")
    assert info["sha256"] == manifest["sha256"]
    tok = AutoTokenizer.from_pretrained(str(out))
    saved = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(_logits(gguf_model, tok), _logits(saved, tok))
