"""Episode viewer: replay a recorded episode from its seed and actions and render each step
(Crafter: crafter's own pixels; POGS: the visible graph) beside the plan, action and inventory,
as an animated GIF or a self-contained HTML page with a step slider.

It replays, it does not re-decide: actions come from the evaluation's steps.jsonl, and a replay
whose rewards drift from the record stops with an error instead of showing a different game.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


class ReplayError(ValueError):
    """The episode cannot be found, or the replay does not reproduce the recorded rewards."""


@dataclass
class RecordedEpisode:
    episode_id: str
    env: str
    seed: int
    env_kwargs: dict
    steps: list[dict]


def load_episode(source: str | os.PathLike[str], episode_id: str | None = None) -> RecordedEpisode:
    """An episode from an evaluation folder (or its steps.jsonl); the first one if no id is given.
    `source` may also be written `FOLDER#EPISODE_ID`."""
    source = str(source)
    if episode_id is None and "#" in source:
        source, episode_id = source.split("#", 1)
    path = Path(source)
    steps_path = path / "steps.jsonl" if path.is_dir() else path
    if not steps_path.is_file():
        raise ReplayError(f"no steps.jsonl at {steps_path} (give an evaluation folder under reports/eval/)")
    steps: list[dict] = []
    chosen = episode_id
    with steps_path.open() as f:
        for line in f:
            row = json.loads(line)
            if chosen is None:
                chosen = row["episode_id"]
            if row["episode_id"] == chosen:
                steps.append(row)
    if not steps:
        raise ReplayError(f"episode {chosen!r} not found in {steps_path}")
    env_kwargs = {}
    episodes_csv = steps_path.with_name("episodes.csv")
    if episodes_csv.is_file():
        with episodes_csv.open() as f:
            for row in csv.DictReader(f):
                if row["episode_id"] == chosen:
                    env_kwargs = json.loads(row["env_kwargs"])
    steps.sort(key=lambda s: s["step"])
    return RecordedEpisode(chosen, steps[0]["env"], int(steps[0]["seed"]), env_kwargs, steps)


def _wrap(text: str | None, width: int = 46, max_lines: int = 9) -> str:
    if not text:
        return "(none)"
    lines = textwrap.wrap(" ".join(text.split()), width)
    return "\n".join(lines[:max_lines] + (["..."] if len(lines) > max_lines else []))


def _panel_text(step: dict | None, info: dict, t: int, total: int) -> str:
    parts = [f"step {t}/{total}"]
    if step is not None:
        flags = []
        if step.get("planned"):
            flags.append("NEW PLAN")
        if step.get("fallback"):
            flags.append("INVALID -> default")
        parts.append(f"action: {step['action']}" + (f"  [{', '.join(flags)}]" if flags else ""))
        parts.append(f"plan:\n{_wrap(step.get('current_plan'))}")
    else:
        parts.append("(reset)")
    if "current_node" in info:
        parts.append(f"at node {info['current_node']}, target {info.get('target_node')}")
    inventory = info.get("inventory")
    if inventory is not None:
        items = ", ".join(f"{k} {v}" for k, v in inventory.items() if v) or "nothing"
        parts.append(f"inventory:\n{_wrap(items)}")
    status = info.get("status")
    if status:
        parts.append("status: " + ", ".join(f"{k} {v}" for k, v in status.items()))
    unlocked = sorted(info.get("achievements", {}))
    parts.append(f"achievements ({len(unlocked)}):\n{_wrap(', '.join(unlocked))}")
    return "\n\n".join(parts)


def _compose(image_fn, text: str) -> np.ndarray:
    fig = plt.figure(figsize=(8.0, 4.2), dpi=80)
    ax_img = fig.add_axes([0.0, 0.0, 0.5, 1.0])
    image_fn(ax_img)
    ax_img.set_axis_off()
    ax_txt = fig.add_axes([0.52, 0.0, 0.48, 1.0])
    ax_txt.set_axis_off()
    ax_txt.text(0.0, 0.98, text, va="top", ha="left", family="monospace", fontsize=7.5)
    fig.canvas.draw()
    frame = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return frame


def _crafter_drawer(env):
    frame = env.render()

    def draw(ax):
        ax.imshow(frame, interpolation="nearest")

    return draw


def _pogs_drawer(info: dict):
    import networkx as nx

    def draw(ax):
        graph = nx.Graph()
        graph.add_edges_from(tuple(e) for e in info.get("visible_edges", []))
        current, target = info.get("current_node"), info.get("target_node")
        if current is not None:
            graph.add_node(current)  # an unseen target stays off the drawing (the panel names it)
        pos = nx.spring_layout(graph, seed=0)
        colors = ["tab:red" if n == current else "tab:green" if n == target else "tab:gray" for n in graph.nodes]
        nx.draw_networkx(graph, pos=pos, ax=ax, node_color=colors, font_size=7, node_size=220)
        ax.set_title(f"at {current} (red), target {target} (green when visible)", fontsize=8)

    return draw


def replay_frames(episode: RecordedEpisode, max_frames: int = 300) -> list[np.ndarray]:
    """Step a fresh env from the episode's seed with the recorded actions; one frame per state
    (the reset state, then after each action), at most `max_frames` evenly spread."""
    from dynaplan.envs import make_env

    kwargs = dict(episode.env_kwargs)
    if episode.env == "crafter":
        kwargs["render_mode"] = "rgb_array"
    env = make_env(episode.env, **kwargs)
    total = len(episode.steps)
    keep = set(np.linspace(0, total, min(max_frames, total + 1)).round().astype(int).tolist())
    frames = []
    try:
        _, info = env.reset(seed=episode.seed)
        for t in range(total + 1):
            if t > 0:
                step = episode.steps[t - 1]
                _, reward, terminated, truncated, info = env.step(step["action"])
                if not math.isclose(reward, step["reward"], abs_tol=1e-6):
                    raise ReplayError(
                        f"replay of {episode.episode_id} diverged at step {step['step']}: reward {reward} "
                        f"but the record says {step['reward']} (different env settings or crafter version?)"
                    )
            if t not in keep:
                continue
            drawer = _crafter_drawer(env) if episode.env == "crafter" else _pogs_drawer(info)
            frames.append(_compose(drawer, _panel_text(episode.steps[t - 1] if t else None, info, t, total)))
    finally:
        env.close()
    return frames


def _png(frame: np.ndarray) -> str:
    import imageio.v3 as iio

    return base64.b64encode(iio.imwrite("<bytes>", frame, extension=".png")).decode()


def write_html(frames: list[np.ndarray], path: Path, title: str) -> None:
    images = ",".join(f'"data:image/png;base64,{_png(f)}"' for f in frames)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>
<body style="font-family:sans-serif">
<h3>{html.escape(title)}</h3>
<input id="slider" type="range" min="0" max="{len(frames) - 1}" value="0" style="width:640px">
<span id="label"></span><br>
<img id="frame" style="width:640px;image-rendering:pixelated">
<script>
const frames = [{images}];
const slider = document.getElementById("slider"), img = document.getElementById("frame"),
      label = document.getElementById("label");
function show(i) {{ img.src = frames[i]; label.textContent = "frame " + i + " / " + (frames.length - 1); }}
slider.oninput = () => show(+slider.value);
document.onkeydown = (e) => {{
  if (e.key === "ArrowRight") slider.value = Math.min(+slider.value + 1, frames.length - 1);
  if (e.key === "ArrowLeft") slider.value = Math.max(+slider.value - 1, 0);
  show(+slider.value);
}};
show(0);
</script></body></html>
"""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(page)
    os.replace(tmp, path)


def replay(source: str | os.PathLike[str], out: str | os.PathLike[str], episode_id: str | None = None,
           max_frames: int = 300, fps: float = 4.0) -> Path:
    """Replay an episode into `out` (.gif or .html); returns the path written."""
    out = Path(out)
    if out.suffix not in (".gif", ".html"):
        raise ReplayError(f"--out must end in .gif or .html, got {out.name}")
    episode = load_episode(source, episode_id)
    frames = replay_frames(episode, max_frames=max_frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".html":
        write_html(frames, out, f"{episode.episode_id} ({episode.env}, seed {episode.seed})")
    else:
        import imageio.v3 as iio

        tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.gif")
        # The pillow GIF writer takes the frame duration in milliseconds.
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=int(1000 / fps), loop=0)
        os.replace(tmp, out)
    return out
