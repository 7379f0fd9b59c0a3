"""Probe (not part of the pipeline): rejection-sampled plan fine-tuning after SFT.

The dynamic student's invalid answers are mostly plans it opens and never closes: teacher forcing
only ever shows it the teacher's plans, and at temperature 1 it writes its own. This probe takes a
trained adapter and, `--rounds` times: forces `--samples` training prompts' answers to open with
`<plan>`, samples the rest of the answer at temperature 1 (to the end of the turn or
`--max-new-tokens`), keeps the samples that are valid answers under the strict protocol, and
trains on them (the student's own plan text, closed as it closed it, then the teacher's action for
that step and the end of the turn; the forced `<plan>` is context, not trained, so the decision to
open a plan gets no gradient from them) together with `--teacher` teacher steps (whole answers),
in one-env batches of 8 through the shared-prefix forward, AdamW at `--lr` after a 4-step warm-up.
It is filtered behaviour cloning on the student's own distribution: the plans it already closes
become more likely, in its own words, with no cut point made up (the earlier repair probe's).
Evaluate the result with `python -m tasks.evaluate --adapter OUT/adapter`.

    python benchmarks/probes/sft_plan_rft.py models/sft-dynamic/adapter OUT --samples 96 --teacher 64 --lr 5e-4
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
import yaml
from peft import PeftModel

from dynaplan.agent.protocol import PLAN_OPEN, format_output, parse_output
from dynaplan.config import parse_params
from dynaplan.train.prefix import shared_prefix_forward
from dynaplan.train.sft import SftPaths, _action_names, chat_ids, load_base, load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--teacher", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--gen-batch", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    params = parse_params(yaml.safe_load(Path("params.yaml").read_text()))
    paths = SftPaths(data_dir=Path("data/teacher"), report=Path("reports/validate/summary.json"),
                     base_dir=Path("models/base"), out_dir=args.out, checkpoint_dir=args.out / "unused")
    data = load_data(params, "dynamic", paths)
    base, tok = load_base(paths.base_dir)
    model = PeftModel.from_pretrained(base, str(args.adapter), is_trainable=True)
    actions = {env: _action_names(env, params) for env in {ex.env for ex in data.train}}
    end_ids = chat_ids(tok, data.train[0])[1][-2:]  # the end of the turn as the chat template writes it
    open_ids = tok(PLAN_OPEN, add_special_tokens=False).input_ids
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def sample(prompts, seed):
        model.eval()
        torch.manual_seed(seed)
        outs = []
        for s in range(0, len(prompts), args.gen_batch):
            batch = prompts[s:s + args.gen_batch]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                     top_k=0, max_new_tokens=args.max_new_tokens, eos_token_id=im_end, pad_token_id=pad)
            for row in out[:, width:].tolist():
                ended = im_end in row
                outs.append((tok.decode(row[:row.index(im_end)] if ended else row), ended))
        return outs

    rng = random.Random(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    log, kept_all = [], []
    for r in range(args.rounds):
        t0 = time.time()
        examples = rng.sample(data.train, args.samples)
        prompts = [chat_ids(tok, ex)[0] + open_ids for ex in examples]
        items, failed = [], []
        for (text, ended), ex, prompt in zip(sample(prompts, args.seed + 1000 + r), examples, prompts):
            parsed = parse_output(PLAN_OPEN + text, actions[ex.env])
            if not (ended and parsed.valid and parsed.plan):
                failed.append(text[:200])
                continue
            answer = format_output(ex.action, parsed.plan)[len(PLAN_OPEN):]
            items.append((ex.env, prompt, tok(answer, add_special_tokens=False).input_ids + end_ids))
            kept_all.append({"plan": parsed.plan, "own_action": parsed.action, "teacher_action": ex.action})
        sampled_s = time.time() - t0
        kept = len(items)
        for ex in rng.sample(data.train, args.teacher):
            prompt, full = chat_ids(tok, ex)
            items.append((ex.env, prompt, full[len(prompt):]))
        rng.shuffle(items)
        by_env: dict[str, list] = {}
        for item in items:
            by_env.setdefault(item[0], []).append(item)
        batches = [rows[i:i + 8] for rows in by_env.values() for i in range(0, len(rows), 8)]
        rng.shuffle(batches)
        model.train()
        losses = []
        for k, batch in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (k + 1) / 4)
            out = shared_prefix_forward(model, [b[1] for b in batch], [b[2] for b in batch], pad_id=pad)
            logp = torch.log_softmax(out.answer_logits(model), -1)
            loss = -(logp.gather(-1, out.targets.unsqueeze(-1)).squeeze(-1) * out.mask).sum() / out.mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 3))
        log.append({"round": r, "samples": args.samples, "kept": kept, "failed": failed,
                    "sample_s": round(sampled_s, 1), "train_s": round(time.time() - t0 - sampled_s, 1), "losses": losses})
        print(json.dumps({k: v for k, v in log[-1].items() if k != "failed"}), flush=True)
    out_adapter = args.out / "adapter"
    if out_adapter.exists():
        shutil.rmtree(out_adapter)
    shutil.copytree(args.adapter, out_adapter)  # the tokenizer and the adapter's metadata
    model.save_pretrained(str(out_adapter))
    (args.out / "rft.json").write_text(json.dumps({"rounds": log, "kept": kept_all}, indent=1))


if __name__ == "__main__":
    main()
