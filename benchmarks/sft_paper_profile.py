"""The paper-scale `sft` profile (params-paper.yaml) on a GPU worker: training tokens/s and peak
GPU memory of the stage's own trainer (`run_sft`), padding-free batches against padded ones,
side by side in one run.

The model is random, of a real model's shape (no download: the speed and memory are the
shape's, the loss is not a result), with the tokenizer of `--tokenizer` (default: the embedded
SmolLM2 tokenizer, extracted from its GGUF). Everything else is the profile as merged by the
`pipeline-paper` deployment: LoRA r=64 on all linear layers of every layer, bf16 weights and
autocast, gradient checkpointing, batches of 8 x 4 accumulated, the dataset normalization of
the loss. `--attn` defaults to the profile's flash_attention_2 when flash-attn is installed,
else sdpa (padding-free stays exact with either: position ids restart per sequence).

    python benchmarks/sft_paper_profile.py --shape llama-3.2-1b --steps 4 --data data/teacher

On the CPU it runs too (`--shape tiny`), to check the script; the numbers mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Llama shapes (config.json of the public checkpoints); the vocabulary is the tokenizer's.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
}


def build_model(shape: str, tokenizer_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """A random Llama of `shape` in `dtype`, initialized on the GPU when there is one (an 8B
    model takes minutes to initialize on CPU cores), saved as the base_model stage saves."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dynaplan.models.materialize import save_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=shape in ("tiny", "llama-3.2-1b", "llama-3.2-3b"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    params = int(sum(p.numel() for p in model.parameters()))
    save_model_dir(model.cpu(), tokenizer, out_dir, {"source": f"random-{shape}", "seed": 0, "param_count": params})
    del model
    return out_dir


def paper_params(steps: int, padding_free: bool, attn: str, eval_examples: int):
    """params.yaml + params-paper.yaml (as the pipeline-paper deployment merges them), trained
    for `steps` optimizer steps with one checkpoint at the end."""
    sys.path.insert(0, str(ROOT))
    from flows.workspace import apply_overrides

    from dynaplan.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = apply_overrides(raw, yaml.safe_load((ROOT / "params-paper.yaml").read_text()))
    raw = apply_overrides(raw, {
        "sft.max_steps": steps, "sft.save_steps": steps, "sft.eval_steps": 0, "sft.padding_free": padding_free,
        "sft.attn_implementation": attn, "sft.eval_examples": eval_examples, "sft.eval_max_new_tokens": 16,
    })
    return parse_params(raw, "params.yaml + params-paper.yaml + benchmark overrides")


def train_once(params, data_dir: Path, report: Path, base_dir: Path, work: Path, label: str) -> dict:
    from dynaplan.train.sft import SftPaths, load_data, run_sft

    paths = SftPaths(data_dir=data_dir, report=report, base_dir=base_dir, out_dir=work / label,
                     checkpoint_dir=work / f"checkpoints-{label}")
    data = load_data(params, "dynamic", paths)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run_sft(params, "dynamic", paths, data=data)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    m = result.metrics
    return {"label": label, "tokens_per_s": m["train_tokens_per_second"], "train_seconds": m["train_seconds"],
            "train_loss": m["train_loss"], "steps": result.global_step, "peak_gib": peak, "wall_s": wall,
            "heldout_loss": m.get("heldout_loss", m.get("loss")), "train_examples": len(data.train)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (8 x 4 sequences each)")
    parser.add_argument("--data", default="data/teacher", help="teacher step shards (the generate stage)")
    parser.add_argument("--report", default="reports/validate/summary.json", help="the validate stage's report")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: SmolLM2's, from the embedded GGUF)")
    parser.add_argument("--work", default=None, help="scratch dir for the model and adapters (default: a temp dir)")
    parser.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 if installed, else sdpa)")
    parser.add_argument("--eval-examples", type=int, default=16, help="held-out steps measured after training")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import importlib.util
    import tempfile

    from dynaplan.models.materialize import smollm2_tokenizer_dir

    attn = args.attn or ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")
    work = Path(args.work or tempfile.mkdtemp(prefix="sft-paper-"))
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else smollm2_tokenizer_dir()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device {device}; torch {torch.__version__}; shape {args.shape}; attention {attn}; {args.steps} steps per run")

    started = time.perf_counter()
    base_dir = build_model(args.shape, tokenizer_dir, work / "base", torch.bfloat16)
    manifest = json.loads((base_dir / "manifest.json").read_text())
    print(f"random {args.shape}: {manifest['param_count'] / 1e9:.2f}B parameters, built and saved in {time.perf_counter() - started:.0f} s")

    rows = []
    for padding_free in (True, False):
        params = paper_params(args.steps, padding_free, attn, args.eval_examples)
        label = "padding_free" if padding_free else "padded"
        row = train_once(params, Path(args.data), Path(args.report), base_dir, work, label)
        rows.append(row)
        print(json.dumps(row), flush=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"paper-profile sft, random {args.shape}, {device}")
    for col in ("batches", "tokens/s", "train s", "peak GPU GiB", "train loss"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["label"], f"{row['tokens_per_s']:.0f}", f"{row['train_seconds']:.1f}", f"{row['peak_gib']:.1f}", f"{row['train_loss']:.3f}")
    Console().print(table)
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"padding-free / padded tokens/s: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "shape": args.shape, "attn": attn, "rows": rows, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
