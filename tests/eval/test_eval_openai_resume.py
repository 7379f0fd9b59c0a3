"""End to end: evaluating through the `openai` backend against a real `dynaplan serve` subprocess
on 127.0.0.1 (the tiny model); killing the server mid-evaluation gives a clear error after the
retries, and re-running the same evaluation against a restarted server resumes from the
finished episodes. Starts two server processes; slow."""

import sys
import threading
import time
from pathlib import Path

import pytest

from dynaplan.eval.runner import EpisodeStore, EvalSpec, run_evaluation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from backend_harness import ServerProcess  # noqa: E402


@pytest.mark.slow
@pytest.mark.e2e
def test_server_killed_mid_evaluation_then_resumed(tmp_path, tiny_model_dir):
    from dynaplan.models.openai import BackendUnavailable

    server = ServerProcess(tiny_model_dir).wait_ready()
    spec = EvalSpec(name="served", env="crafter", policy="model", model=str(tiny_model_dir), backend="openai",
                    base_url=server.url, mode="dynamic", episodes=3, num_envs=1, max_steps=3, max_new_tokens=6,
                    env_kwargs={"max_steps": 2000, "area": 64})
    store = tmp_path / "store.jsonl"

    def kill_after_first_episode():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (store.is_file() and store.read_bytes().count(b"\n") >= 1):
            time.sleep(0.05)
        server.stop()

    killer = threading.Thread(target=kill_after_first_episode)
    killer.start()
    try:
        with pytest.raises(BackendUnavailable, match="could not reach"):
            run_evaluation(spec, store, progress=False)
    finally:
        killer.join()
        server.stop()
    finished = len(EpisodeStore(store).load())
    assert 1 <= finished < 3

    again = ServerProcess(tiny_model_dir, port=server.port).wait_ready()
    try:
        result = run_evaluation(spec, store, progress=False)
    finally:
        again.stop()
    assert result.resumed == finished and result.played == 3 - finished
    assert [ep["seed"] for ep in result.episodes] == spec.seeds
    assert all(ep["length"] == 3 for ep in result.episodes)
