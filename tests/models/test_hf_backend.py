"""HFBackend specifics: agreement with transformers' own generate, padding/prefix-cache
invariance, score() matching the rollout log-probs, LoRA adapters and their mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch

from dynaplan.models.base import GenerationRequest, SamplingParams
from dynaplan.models.hf import AdapterMismatchError, HFBackend, plan_opening_token_ids

SYSTEM = {"role": "system", "content": "You play a text game. Answer with one action: Noop, Do, Move West."}


def _requests(n: int = 3) -> list[GenerationRequest]:
    # different lengths on purpose: left padding must not change any answer
    return [
        GenerationRequest([SYSTEM, {"role": "user", "content": "You see a tree to the west. " * (i + 1)}])
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return HFBackend(tiny_model_dir)


def test_greedy_matches_transformers_generate(hf):
    request = _requests(1)[0]
    ours = hf.generate([request], SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)[0]
    ids = torch.tensor([ours.prompt_token_ids])
    with torch.no_grad():
        ref = hf.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    ref_tokens = ref[0, ids.shape[1] :].tolist()
    stop = min((i for i, t in enumerate(ref_tokens) if t in hf.stop_ids), default=len(ref_tokens) - 1)
    assert ours.token_ids == ref_tokens[: stop + 1]


def test_batch_padding_and_prefix_cache_do_not_change_answers(tiny_model_dir, hf):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    batch = hf.generate(_requests(3), sampling, seed=0)
    alone = [hf.generate([r], sampling, seed=0)[0] for r in _requests(3)]
    no_cache = HFBackend.from_model(hf.model, hf.tokenizer, prefix_cache=False).generate(_requests(3), sampling, seed=0)
    for a, b, c in zip(batch, alone, no_cache):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, c.logprobs)) < 1e-4
    assert hf.stats["cached_prefix_tokens"] > 0


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_score_reproduces_rollout_logprobs(hf, temperature):
    requests = _requests(3) + [GenerationRequest(_requests(1)[0].messages, prefix="<plan>\n")]
    gens = hf.generate(requests, SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=7), seed=3)
    scored = hf.score([g.prompt_token_ids for g in gens], [g.token_ids for g in gens], temperature=temperature)
    for g, s in zip(gens, scored):
        assert len(s) == len(g.token_ids) == len(g.logprobs)
        assert max(abs(a - b) for a, b in zip(g.logprobs, s)) < 1e-3


def test_plan_opening_tokens_cover_the_smollm2_spelling(hf):
    banned = set(plan_opening_token_ids(hf.tokenizer))
    first = hf.tokenizer.encode("<plan>", add_special_tokens=False)[0]
    assert first in banned
    assert hf.tokenizer.convert_tokens_to_ids("<|im_end|>") not in banned
    assert not any(hf.tokenizer.decode([t]).strip() in {"Noop", "Do", "Move"} for t in banned)


# ---- LoRA adapters -------------------------------------------------------------------------------


def _save_adapter(model_dir, out, *, r: int = 4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out))
    return peft_model


def test_adapter_changes_outputs_like_peft(tiny_model_dir, tmp_path, hf):
    peft_model = _save_adapter(tiny_model_dir, tmp_path / "adapter")
    backend = HFBackend(tiny_model_dir, tmp_path / "adapter")
    request = _requests(1)[0]
    ids = torch.tensor([hf.prompt_token_ids(request)])
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits[0, -1]
        got = backend.model(input_ids=ids).logits[0, -1]
        base = hf.model(input_ids=ids).logits[0, -1]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)
    merged = HFBackend(tiny_model_dir, tmp_path / "adapter", merge_adapter=True)
    with torch.no_grad():
        assert torch.allclose(merged.model(input_ids=ids).logits[0, -1], want, atol=1e-4)


def test_adapter_for_another_base_is_refused(tiny_model_dir, smollm2_tokenizer_dir, tmp_path):
    from dynaplan.models.materialize import build_tiny_model

    other = build_tiny_model(tmp_path / "wide", smollm2_tokenizer_dir, hidden_size=96, num_heads=4, seed=1)
    _save_adapter(other, tmp_path / "wide-adapter")
    with pytest.raises(AdapterMismatchError, match="wide"):
        HFBackend(tiny_model_dir, tmp_path / "wide-adapter")
    # even when the recorded base name is bypassed, the shapes are checked
    with pytest.raises(AdapterMismatchError, match="does not fit"):
        HFBackend(tiny_model_dir, tmp_path / "wide-adapter", check_adapter_base=False)
    # a base name that is no local dir and not ours
    cfg_path = tmp_path / "wide-adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="Llama-3.1-8B"):
        HFBackend(tiny_model_dir, tmp_path / "wide-adapter")
    with pytest.raises(AdapterMismatchError, match="adapter_config.json"):
        HFBackend(tiny_model_dir, tmp_path)


def test_sampling_runs_in_eval_mode_and_restores_train_mode(hf):
    seen = []
    hook = hf.model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    hf.model.train()
    try:
        hf.generate(_requests(1), SamplingParams(max_new_tokens=2), seed=0)
        hf.score([[1, 2, 3]], [[4]])
        assert hf.model.training  # the trainer's mode is given back
    finally:
        hf.model.eval()
        hook.remove()
    assert seen and not any(seen)  # but no forward ran with dropout on
