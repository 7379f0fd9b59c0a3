"""Evaluating a registered `dynaplan-agent` version (`models:/dynaplan-agent/<v>` and `@alias`)
puts the numbers on that version. Uses MLflow on a temporary SQLite store and a LoRA adapter
on the tiny model; slow (logging the pyfunc model loads it once)."""

import pytest

from dynaplan.eval.runner import EvalSpec, evaluate


@pytest.mark.slow
def test_registry_model_is_resolved_and_gets_the_metrics(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DYNAPLAN_ROOT", str(tmp_path))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynaplan import tracking

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    import json

    from dynaplan.train.sft import ADAPTER_META, base_fingerprint

    (adapter / ADAPTER_META).write_text(json.dumps({"base_model": "tiny", "base_fingerprint": base_fingerprint(tiny_model_dir)}))
    with tracking.stage_run("sft"):
        info = tracking.log_agent_model(adapter, tiny_model_dir, base_model="tiny", max_new_tokens=4,
                                        example_messages=[{"role": "user", "content": "hi"}])
    version = tracking.register_agent(info.model_uri, stage="sft", variant="dynamic", base_model="tiny",
                                      dataset_digest="none").version
    tracking.set_alias("dynaplan-agent", "challenger", str(version))

    spec = EvalSpec(name="reg", env="pogs", policy="model", model="models:/dynaplan-agent/@challenger",
                    episodes=1, num_envs=1, max_steps=2, max_new_tokens=4,
                    env_kwargs={"num_nodes": 8, "max_steps": 30})
    result, _ = evaluate(spec, tmp_path / "out", tmp_path / "resume", progress=False)
    tags = tracking.version_tags("dynaplan-agent", str(version))
    assert float(tags["eval.reg.episodes"]) == 1
    assert float(tags["eval.reg.progression"]) == pytest.approx(result.metrics["progression"], abs=1e-5)
    assert "eval.reg.generated_tokens" in tags
