"""SFT priming (train/sft.py, train/sft_data.py): the dataset views and split, exact batching,
bad input caught before training, a tracked run that registers its adapter and loads back with
the same greedy answers, and a killed run that resumes from its checkpoint (tiny model)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from sft_fixtures import write_teacher_dataset

from dynaplan.agent.protocol import PLAN_OPEN
from dynaplan.config import parse_params
from dynaplan.data.dataset import read_table
from dynaplan.train.sft_data import SftInputError, build_examples, split_by_episode

ROOT = Path(__file__).resolve().parents[2]

TINY_SFT = {
    "max_steps": 4,
    "batch_size": 4,
    "grad_accum": 2,
    "save_steps": 2,
    "eval_examples": 6,
    "eval_max_new_tokens": 6,
    "eval_batch_size": 6,
    "learning_rate": 2e-3,
    "bf16": False,
    "register_checkpoints": False,
    "average_checkpoints": 1,
    "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
}


def _paths(root: Path, base_dir: Path, variant: str = "dynamic"):
    from dynaplan.train.sft import SftPaths

    return SftPaths(
        data_dir=root / "data" / "teacher",
        report=root / "reports" / "validate" / "summary.json",
        base_dir=base_dir,
        out_dir=root / "models" / f"sft-{variant}",
        checkpoint_dir=root / "checkpoints" / f"sft-{variant}",
    )


def _collate(trainer, features):
    """A collated batch on the trainer's device (the Trainer moves its own batches there; these
    tests call compute_loss directly, so on a GPU worker the inputs must follow the model)."""
    return trainer._prepare_inputs(trainer.data_collator(features))


@pytest.fixture(scope="module")
def teacher_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft-project")
    write_teacher_dataset(root)
    return root


# ---- the dataset ------------------------------------------------------------------------------


def test_split_holds_out_whole_episodes_of_every_env_and_is_seeded(teacher_data):
    rows = read_table(teacher_data / "data" / "teacher").to_pylist()
    train, heldout = split_by_episode(rows, eval_fraction=0.25, seed=3)
    train_eps = {r["episode_id"] for r in train}
    held_eps = {r["episode_id"] for r in heldout}
    assert not train_eps & held_eps
    assert {r["env"] for r in heldout} == {"crafter", "pogs"}
    assert len(train) + len(heldout) == len(rows)
    assert split_by_episode(rows, 0.25, 3) == (train, heldout)
    assert split_by_episode(rows, 0.25, 4)[1] != heldout  # another seed, other episodes (4 per env)


def test_naive_view_strips_every_plan_but_keeps_the_teachers_actions(teacher_data):
    rows = read_table(teacher_data / "data" / "teacher").to_pylist()
    dynamic, naive = build_examples(rows, "dynamic"), build_examples(rows, "naive")
    assert any(ex.completion.startswith(PLAN_OPEN) for ex in dynamic)
    for dyn, nav in zip(dynamic, naive):
        assert nav.completion == dyn.action == nav.action
        assert "<plan>" not in json.dumps(nav.prompt) and "Current plan:" not in nav.prompt[1]["content"]
        assert "Do not write plans" in nav.prompt[0]["content"]
        assert nav.planned == dyn.planned  # the teacher's decision is kept for the plan-rate metric
    assert dynamic[0].prompt == json.loads(rows[0]["messages"])  # the stored shared-builder prompt


# ---- exactness of the batching we use -----------------------------------------------------------


def test_padding_free_and_labelled_only_scoring_give_the_padded_loss(teacher_data, tiny_model_dir):
    import torch
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from dynaplan.train.sft import (
        load_base,
        load_data,
        make_config,
        make_lora_config,
        score_labelled_positions_only,
        to_dataset,
    )

    params = parse_params({"sft": TINY_SFT})
    paths = _paths(teacher_data, tiny_model_dir)
    data = load_data(params, "dynamic", paths)
    model, tokenizer = load_base(tiny_model_dir)
    trainer = SFTTrainer(
        model=model,
        args=make_config(params, teacher_data / "exactness", has_eval=False),
        train_dataset=to_dataset(data.train[:6]),
        processing_class=tokenizer,
        peft_config=make_lora_config(params),
    )
    features = [trainer.train_dataset[i] for i in range(6)]
    features = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
    padded = trainer._prepare_inputs(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(features))
    flat = trainer._prepare_inputs(DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features))
    assert flat["input_ids"].shape[0] == 1 and (flat["input_ids"].shape[1] == padded["attention_mask"].sum())
    trainer.model.eval()
    with torch.no_grad():
        loss_padded = trainer.compute_loss(trainer.model, dict(padded))
        loss_flat = trainer.compute_loss(trainer.model, dict(flat))
        with score_labelled_positions_only():
            loss_compact = trainer.compute_loss(trainer.model, dict(flat))
    assert loss_flat.item() == pytest.approx(loss_padded.item(), rel=1e-5)
    assert loss_compact.item() == pytest.approx(loss_padded.item(), rel=1e-5)


def test_env_batches_keep_one_env_per_batch_in_a_seeded_order(teacher_data):
    from dynaplan.train.sft_data import env_batches

    examples = build_examples(read_table(teacher_data / "data" / "teacher").to_pylist(), "dynamic")
    ordered = env_batches(examples, 4, seed=0)
    assert sorted(map(id, ordered)) == sorted(map(id, examples))  # a permutation
    batches = [ordered[i : i + 4] for i in range(0, len(ordered), 4)]
    mixed = [b for b in batches if len({ex.env for ex in b}) > 1]
    assert len(mixed) <= 1  # only where one env's steps run into the next env's
    assert {ex.env for ex in batches[0]} != {ex.env for ex in batches[-1]} or len(batches[-1]) == 4
    assert env_batches(examples, 4, seed=0) == ordered and env_batches(examples, 4, seed=1) != ordered
    assert len(batches[-1]) == len(examples) % 4 or len(examples) % 4 == 0  # a short batch stays last


def test_balanced_env_batches_give_every_batch_its_share_of_plan_steps():
    """sft.balance_plan_batches: the length grouping puts the (longer) plan steps together, so
    plain env batches hold 0 to all of them; balanced ones hold the env's share in every batch."""
    from dynaplan.train.sft_data import SftExample, env_batches

    def example(env: str, i: int, planned: bool) -> SftExample:
        return SftExample(prompt=[], completion=f"{env}{i}", episode_id=env, env=env, step=i, action="noop", planned=planned)

    # crafter: 40 steps (every 4th a plan), pogs: 24 (every 4th a plan); a quarter are plans
    examples = [example(env, i, i % 4 == 0) for env, n in (("crafter", 40), ("pogs", 24)) for i in range(n)]
    lengths = [300 if ex.planned else 200 + ex.step for ex in examples]
    plain = env_batches(examples, 8, seed=0, lengths=lengths)
    balanced = env_batches(examples, 8, seed=0, lengths=lengths, balance_plans=True)
    assert sorted(map(id, balanced)) == sorted(map(id, examples))  # a permutation
    plans_per_batch = lambda order: [sum(ex.planned for ex in order[i : i + 8]) for i in range(0, len(order), 8)]
    assert max(plans_per_batch(plain)) >= 4 and min(plans_per_batch(plain)) == 0
    assert plans_per_batch(balanced) == [2] * 8
    short_runs = env_batches(examples, 8, seed=0, lengths=lengths, window=2, balance_plans=True)  # sft.length_group_batches
    assert plans_per_batch(short_runs) == [2] * 8 and short_runs != balanced
    batches = [balanced[i : i + 8] for i in range(0, len(balanced), 8)]
    assert all(len({ex.env for ex in b}) == 1 for b in batches)
    assert env_batches(examples, 8, seed=0, lengths=lengths, balance_plans=True) == balanced
    assert env_batches(examples, 8, seed=1, lengths=lengths, balance_plans=True) != balanced


def test_a_plan_tolerance_trades_exact_balance_for_less_padding():
    """sft.plan_batch_tolerance: a batch may hold its share of plan steps +-1, so the length sort
    keeps rows of like length together; no batch goes outside that range, every example stays."""
    from dynaplan.train.sft_data import SftExample, env_batches

    def example(env: str, i: int, planned: bool) -> SftExample:
        return SftExample(prompt=[], completion=f"{env}{i}", episode_id=env, env=env, step=i, action="noop", planned=planned)

    # 67 crafter steps (every 4th a plan: 17) and 13 pogs steps (4 plans): neither fills whole batches
    examples = [example(env, i, i % 4 == 0) for env, n in (("crafter", 67), ("pogs", 13)) for i in range(n)]
    rng = np.random.default_rng(0)
    lengths = [int(rng.integers(200, 600)) for _ in examples]
    size = {id(ex): n for ex, n in zip(examples, lengths)}
    padding = lambda order: sum(
        max(size[id(e)] for e in order[i : i + 8]) * len(order[i : i + 8]) - sum(size[id(e)] for e in order[i : i + 8])
        for i in range(0, len(order), 8)
    )
    exact = env_batches(examples, 8, seed=0, lengths=lengths, balance_plans=True)
    loose = env_batches(examples, 8, seed=0, lengths=lengths, balance_plans=True, plan_tolerance=1)
    for order in (exact, loose):
        assert sorted(map(id, order)) == sorted(map(id, examples))
    batches = lambda order: [order[i : i + 8] for i in range(0, len(order), 8)]
    one_env = lambda order: [b for b in batches(order) if len({e.env for e in b}) == 1 and len(b) == 8]
    # 8 crafter and 1 pogs batch of one env; the 3 + 5 rows left over make one mixed batch
    assert len(one_env(exact)) == len(one_env(loose)) == 9 and len(batches(loose)) == 10
    crafter = lambda order: [sum(e.planned for e in b) for b in one_env(order) if b[0].env == "crafter"]
    assert crafter(exact) == [2] * 8 and set(crafter(loose)) <= {1, 2, 3} and crafter(loose) != crafter(exact)
    assert padding(loose) < padding(exact)


def test_shared_prefix_loss_equals_trls_loss_and_gradients(teacher_data, tiny_model_dir, monkeypatch):
    """The SFT loss that runs a batch's common system prompt once gives TRL's own loss, LoRA
    gradients and logged metrics on the same collated batch."""
    import torch
    from trl import SFTTrainer

    from dynaplan.train.prefix import MIN_SHARED_PREFIX, shared_prefix_len
    from dynaplan.train.sft import (
        labelled_rows,
        load_base,
        load_data,
        make_config,
        make_lora_config,
        prefix_groups,
        sft_trainer_class,
        to_dataset,
    )

    params = parse_params({"sft": {**TINY_SFT, "lora": {**TINY_SFT["lora"], "dropout": 0.0}}})
    data = load_data(params, "dynamic", _paths(teacher_data, tiny_model_dir))
    # a batch that spans both envs: one shared forward per system prompt
    mixed = [ex for ex in data.train if ex.env == "crafter"][:3] + [ex for ex in data.train if ex.env == "pogs"][:2]
    model, tokenizer = load_base(tiny_model_dir)
    trainer = sft_trainer_class()(
        model=model,
        args=make_config(params, teacher_data / "shared-prefix", has_eval=False),
        train_dataset=to_dataset(mixed),
        processing_class=tokenizer,
        peft_config=make_lora_config(params),
    )
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # zero at init, which would leave every lora_A gradient zero
            torch.nn.init.normal_(param, std=0.02)
    batch = _collate(trainer, [trainer.train_dataset[i] for i in range(5)])
    prompts, answers = labelled_rows(batch)
    assert prefix_groups(prompts) == [[0, 1, 2], [3, 4]] and all(answers)
    assert all(shared_prefix_len([prompts[i] for i in g]) >= MIN_SHARED_PREFIX for g in prefix_groups(prompts))
    trainer.model.train()

    def loss_and_grads(compute):
        trainer.model.zero_grad()
        loss = compute(trainer, trainer.model, dict(batch), num_items_in_batch=torch.tensor(40))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    trl_compute_loss = SFTTrainer.compute_loss
    trl_loss, trl_grads = loss_and_grads(trl_compute_loss)
    trl_metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    ours = type(trainer).compute_loss
    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda *a, **k: pytest.fail("fell back to TRL's loss"))
    ours_loss, ours_grads = loss_and_grads(ours)
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5)
    assert trl_grads.keys() == ours_grads.keys() and len(ours_grads) > 0
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-5, rtol=1e-4)
    for key in ("entropy", "mean_token_accuracy"):
        assert trainer._metrics["train"][key][-1] == pytest.approx(trl_metrics[key][-1], rel=1e-4)
    # the token count TRL's tokens/s uses: every row's real tokens, counted once per batch each time
    assert trainer._total_train_tokens == 2 * int(batch["attention_mask"].sum())

    # sft.loss_normalization dataset: the same summed loss over a fixed denominator, on both paths
    trainer.loss_tokens_per_step = 17.0
    assert loss_and_grads(ours)[0] * 17.0 == pytest.approx(trl_loss * 40, rel=1e-5)
    monkeypatch.setattr(SFTTrainer, "compute_loss", trl_compute_loss)
    trainer.shared_prefix = False
    assert loss_and_grads(ours)[0] * 17.0 == pytest.approx(trl_loss * 40, rel=1e-5)


def test_plan_share_samples_more_plans_and_weighs_the_decision_back_to_the_teachers_rate(teacher_data, tiny_model_dir):
    """sft.plan_share: a stratified sample with more plans, the same steps for both variants, and
    first-token weights under which the loss's plan-decision fixed point is the teacher's rate."""
    from dynaplan.train.sft import load_data, plan_rate_fixed_point
    from dynaplan.train.sft_data import read_rows

    count = 24
    params = parse_params({"sft": {**TINY_SFT, "max_train_examples": count, "plan_share": 0.5}})
    data = load_data(params, "dynamic", _paths(teacher_data, tiny_model_dir))
    naive = load_data(params, "naive", _paths(teacher_data, tiny_model_dir))
    plain = load_data(parse_params({"sft": {**TINY_SFT, "max_train_examples": count, "plan_share": 0.0}}), "dynamic", _paths(teacher_data, tiny_model_dir))
    assert len(data.train) == count and naive.decision_weights is None and plain.decision_weights is None
    assert [(ex.episode_id, ex.step) for ex in naive.train] == [(ex.episode_id, ex.step) for ex in data.train]
    assert [(ex.episode_id, ex.step) for ex in data.heldout] == [(ex.episode_id, ex.step) for ex in plain.heldout]
    held_out = {ex.episode_id for ex in data.heldout}
    pool = [r for r in read_rows(teacher_data / "data" / "teacher", params.sft.envs) if r["episode_id"] not in held_out]
    for env, (w_plan, w_act) in data.decision_weights.items():
        sample = [ex for ex in data.train if ex.env == env]
        teacher = np.mean([r["planned"] for r in pool if r["env"] == env])
        assert sum(ex.planned for ex in sample) == round(0.5 * len(sample)) and 0.5 * len(sample) > teacher * len(sample) + 1
        assert sum(r["env"] == env for r in pool) * count / len(pool) == pytest.approx(len(sample), abs=1)
        planned = [ex.completion.startswith(PLAN_OPEN) for ex in sample]
        weights = [w_plan if p else w_act for p in planned]
        assert plan_rate_fixed_point(planned, [1] * len(sample), 4, "dataset", weights) == pytest.approx(teacher)
        assert plan_rate_fixed_point(planned, [1] * len(sample), 4, "dataset") == pytest.approx(0.5, abs=0.05)
    with pytest.raises(Exception, match="sft.plan_share=0.5 .* sft.shared_prefix true"):
        parse_params({"sft": {**TINY_SFT, "plan_share": 0.5, "shared_prefix": False}})


def test_first_token_weights_scale_exactly_the_answers_first_token(teacher_data, tiny_model_dir, monkeypatch):
    """The weighted shared-prefix loss with weight 0 on every first answer token is TRL's loss on
    the same batch with those labels masked; with weight w it is linear in w; a one-row batch is
    weighed too."""
    import torch
    from trl import SFTTrainer

    from dynaplan.train.sft import (
        chat_ids, example_first_token_weights, load_base, load_data, make_config, make_lora_config, sft_trainer_class,
        to_dataset, weights_by_token_ids,
    )

    params = parse_params({"sft": {**TINY_SFT, "lora": {**TINY_SFT["lora"], "dropout": 0.0}}})
    data = load_data(params, "dynamic", _paths(teacher_data, tiny_model_dir))
    batch_examples = [ex for ex in data.train if ex.env == "crafter"][:4]
    model, tokenizer = load_base(tiny_model_dir)
    trainer = sft_trainer_class()(
        model=model, args=make_config(params, teacher_data / "first-token", has_eval=False),
        train_dataset=to_dataset(batch_examples), processing_class=tokenizer, peft_config=make_lora_config(params),
    )
    batch = _collate(trainer, [trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()

    def loss(weight, inputs=batch, ours=True):
        opens = [ex.completion.startswith(PLAN_OPEN) for ex in batch_examples]
        weights = example_first_token_weights(batch_examples, opens, {"crafter": (weight, weight)})
        full_ids = [chat_ids(tokenizer, ex)[1] for ex in batch_examples]
        trainer.first_token_weights = weights_by_token_ids(full_ids, weights) if ours else None
        compute = type(trainer).compute_loss if ours else SFTTrainer.compute_loss
        with torch.no_grad():
            return compute(trainer, trainer.model, dict(inputs), num_items_in_batch=torch.tensor(40)).item()

    masked = dict(batch, labels=batch["labels"].clone())
    for row in masked["labels"]:
        row[int((row != -100).nonzero()[0])] = -100
    assert loss(0.0) == pytest.approx(loss(None, masked, ours=False), rel=1e-5)
    assert loss(1.0) == pytest.approx(loss(None, ours=False), rel=1e-5)
    assert loss(2.5) - loss(0.0) == pytest.approx(2.5 * (loss(1.0) - loss(0.0)), rel=1e-4) and loss(1.0) > loss(0.0)
    # a one-row batch (a short last batch) takes the weighted path too: TRL's loss at weight 1
    one_row = _collate(trainer, [trainer.train_dataset[0]])
    trl_one_row = loss(None, one_row, ours=False)
    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda *a, **k: pytest.fail("fell back to TRL's loss"))
    assert loss(1.0, one_row) == pytest.approx(trl_one_row, rel=1e-5)
    trainer.first_token_weights = {}
    with pytest.raises(RuntimeError, match="not one of the weighted examples"):
        type(trainer).compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=torch.tensor(40))


def test_format_loss_adds_the_weighted_nll_of_a_valid_first_answer_token(teacher_data, tiny_model_dir):
    """sft.format_loss_weight: the shared-prefix loss of a batch that spans both envs plus, per
    answer, weight x -log P(first answer token can begin a valid answer in its env), over the
    same denominator; the mean of that NLL is logged; it needs the shared-prefix loss."""
    import torch

    from dynaplan.agent.protocol import is_valid_prefix
    from dynaplan.train.sft import (
        _action_names, chat_ids, format_start_ids, load_base, load_data, make_config, make_lora_config, sft_trainer_class,
        to_dataset,
    )

    params = parse_params({"sft": {**TINY_SFT, "plan_share": 0.0, "lora": {**TINY_SFT["lora"], "dropout": 0.0}}})
    data = load_data(params, "dynamic", _paths(teacher_data, tiny_model_dir))
    mixed = [ex for ex in data.train if ex.env == "crafter"][:3] + [ex for ex in data.train if ex.env == "pogs"][:2]
    model, tokenizer = load_base(tiny_model_dir)
    chat = {id(ex): chat_ids(tokenizer, ex) for ex in mixed}
    ids = format_start_ids(tokenizer, chat, mixed, params)
    assert len(ids) == 2
    trainer = sft_trainer_class()(
        model=model, args=make_config(params, teacher_data / "format-loss", has_eval=False),
        train_dataset=to_dataset(mixed), processing_class=tokenizer, peft_config=make_lora_config(params),
    )
    batch = _collate(trainer, [trainer.train_dataset[i] for i in range(len(mixed))])
    trainer.model.train()

    def loss(weight):
        trainer.format_loss = None if weight is None else (weight, ids)
        with torch.no_grad():
            return type(trainer).compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=torch.tensor(40)).item()

    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    actions = {env: _action_names(env, params) for env in ("crafter", "pogs")}
    expected = 0.0
    with torch.no_grad():
        for ex in mixed:
            valid = [i for i, t in enumerate(texts) if i not in special and t and is_valid_prefix(t, actions[ex.env])]
            logp = trainer.model(torch.tensor([chat[id(ex)][0]], device=trainer.args.device)).logits[0, -1].float().log_softmax(-1)
            expected -= float(torch.logsumexp(logp[valid], -1))
    plain = loss(None)
    assert loss(0.0) == pytest.approx(plain, rel=1e-6)
    assert loss(2.0) - plain == pytest.approx(2.0 * expected / 40, rel=1e-4)
    assert trainer._metrics["train"]["valid_start_nll"][-1] == pytest.approx(expected / len(mixed), rel=1e-4)
    with pytest.raises(Exception, match="sft.format_loss_weight=1.0 .* sft.shared_prefix true"):
        parse_params({"sft": {**TINY_SFT, "plan_share": 0.0, "format_loss_weight": 1.0, "shared_prefix": False}})


def test_outside_plan_format_loss_adds_the_weighted_nll_of_valid_next_tokens_after_the_first(teacher_data, tiny_model_dir):
    """sft.format_loss_scope: outside_plan: on top of the first-token term, per answer, weight x
    the summed -log P(next token keeps the answer valid) over its later positions outside the plan
    text (sets checked against the protocol in test_format_loss.py), computed here from one plain
    forward per example; its mean per answer is logged."""
    import torch

    from dynaplan.train.sft import (
        chat_ids, format_continuations, format_start_ids, load_base, load_data, make_config, make_lora_config, prompt_key,
        sft_trainer_class, to_dataset,
    )

    params = parse_params({"sft": {**TINY_SFT, "plan_share": 0.0, "format_loss_scope": "outside_plan", "lora": {**TINY_SFT["lora"], "dropout": 0.0}}})
    data = load_data(params, "dynamic", _paths(teacher_data, tiny_model_dir))
    crafter = [ex for ex in data.train if ex.env == "crafter"]
    mixed = [ex for ex in crafter if ex.completion.startswith(PLAN_OPEN)][:2] + crafter[:1]
    mixed += [ex for ex in data.train if ex.env == "pogs"][:2]
    model, tokenizer = load_base(tiny_model_dir)
    chat = {id(ex): chat_ids(tokenizer, ex) for ex in mixed}
    scorer = format_continuations(tokenizer, chat, mixed, params, model)
    trainer = sft_trainer_class()(
        model=model, args=make_config(params, teacher_data / "format-loss-outside", has_eval=False),
        train_dataset=to_dataset(mixed), processing_class=tokenizer, peft_config=make_lora_config(params),
    )
    batch = _collate(trainer, [trainer.train_dataset[i] for i in range(len(mixed))])
    trainer.model.train()
    trainer.format_loss = (3.0, format_start_ids(tokenizer, chat, mixed, params))

    def loss(continuations):
        trainer.format_continuations = continuations
        with torch.no_grad():
            return type(trainer).compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=torch.tensor(40)).item()

    expected = 0.0
    with torch.no_grad():
        for ex in mixed:
            prompt, full = chat[id(ex)]
            logp = trainer.model(torch.tensor([full], device=trainer.args.device)).logits[0].float().log_softmax(-1)
            for k, index in scorer.positions(prompt_key(prompt), full[len(prompt):]):
                expected -= float(torch.logsumexp(logp[len(prompt) - 1 + k, scorer.sets[index]], -1))
    assert expected > 0
    first_only = loss(None)
    assert loss(scorer) - first_only == pytest.approx(3.0 * expected / 40, rel=1e-3)
    trainer.format_continuation_weight = 7.0  # sft.format_loss_continuation_weight: the later positions' own weight
    assert loss(scorer) - first_only == pytest.approx(7.0 * expected / 40, rel=1e-3)
    assert trainer._metrics["train"]["valid_continuation_nll"][-1] == pytest.approx(expected / len(mixed), rel=1e-3)
    assert format_continuations(tokenizer, chat, mixed, parse_params({"sft": {**TINY_SFT, "format_loss_scope": "first_token"}}), model) is None
    assert not scorer.plan_breaks
    assert format_continuations(tokenizer, chat, mixed, parse_params({"sft": {**TINY_SFT, "format_loss_scope": "plan_breaks"}}), model).plan_breaks
    # the format loss off (weight 0): nothing past the first token is scored, whatever the scope
    assert format_continuations(tokenizer, chat, mixed, parse_params({"sft": {**TINY_SFT, "format_loss_weight": 0.0}}), model) is None


def test_warmup_stable_decay_holds_the_rate_then_decays_it_over_the_last_share_of_steps(tmp_path, tiny_model_dir):
    from dynaplan.train.sft import run_sft

    params = parse_params({"sft": {
        **TINY_SFT, "max_steps": 8, "grad_accum": 1, "save_steps": 100, "warmup_ratio": 0.0,
        "lr_scheduler": "warmup_stable_decay", "lr_decay_ratio": 0.5,
    }})
    rates: dict[int, float] = {}
    log = lambda metrics, step: rates.update({step: metrics["train.learning_rate"]}) if "train.learning_rate" in metrics else None
    write_teacher_dataset(tmp_path)
    run_sft(params, "dynamic", _paths(tmp_path, tiny_model_dir), log=log)
    lr = [rates[s] for s in sorted(rates)]
    assert sorted(rates) == list(range(1, 9))
    # each step's rate: the peak until the decay's 4 steps (the last half), which go linearly towards 0
    assert lr == pytest.approx([2e-3] * 5 + [1.5e-3, 1e-3, 0.5e-3])
    with pytest.raises(Exception, match="sft.warmup_ratio=0.5 \\+ sft.lr_decay_ratio=0.6"):
        parse_params({"sft": {**TINY_SFT, "lr_scheduler": "warmup_stable_decay", "warmup_ratio": 0.5, "lr_decay_ratio": 0.6}})


def test_valid_start_probability_is_the_first_answer_tokens_mass_that_can_still_end_valid(teacher_data, tiny_model_dir):
    """completion_stats' valid_start_prob (student) and base_valid_start_prob: the probability,
    at the first answer position, of the tokens a valid answer can begin with, per prompt and
    averaged, equal to a plain full forward of each prompt with the adapter on and off."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dynaplan.agent.protocol import is_valid_prefix
    from dynaplan.train.sft import _action_names, chat_ids, completion_stats, load_base, load_data

    params = parse_params({"sft": TINY_SFT})
    examples = load_data(params, "dynamic", _paths(teacher_data, tiny_model_dir)).heldout
    assert {ex.env for ex in examples} == {"crafter", "pogs"}
    base, tokenizer = load_base(tiny_model_dir)
    torch.manual_seed(0)  # a random adapter (B != 0), so the student differs from its base
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    actions = {env: _action_names(env, params) for env in ("crafter", "pogs")}
    stats = completion_stats(model, tokenizer, examples, 4, actions)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)

    def expected(adapter: bool) -> dict[str, list[float]]:
        per_env: dict[str, list[float]] = {}
        for ex in examples:
            ids = set(i for i, t in enumerate(texts) if i not in special and t and is_valid_prefix(t, actions[ex.env]))
            prompt = torch.tensor([chat_ids(tokenizer, ex)[0]])
            with torch.no_grad(), (contextlib.nullcontext() if adapter else model.disable_adapter()):
                probs = model(prompt).logits[0, -1].float().softmax(-1)
            per_env.setdefault(ex.env, []).append(float(probs[sorted(ids)].sum()))
        return per_env

    student, reference = expected(True), expected(False)
    assert stats["valid_start_prob"] == pytest.approx(np.mean([p for v in student.values() for p in v]), abs=1e-5)
    assert stats["base_valid_start_prob"] == pytest.approx(np.mean([p for v in reference.values() for p in v]), abs=1e-5)
    for env, probs in student.items():
        assert stats["valid_start_prob_per_env"][env] == pytest.approx(np.mean(probs), abs=1e-5)
    assert stats["valid_start_prob"] != pytest.approx(stats["base_valid_start_prob"], abs=1e-6)
    assert "valid_start_prob" not in completion_stats(model, tokenizer, examples[:2], 4)


def test_checkpoint_hook_leaves_the_training_random_state_alone(tmp_path):
    import random

    import numpy as np
    import torch

    from dynaplan.train.sft import _trainer_callbacks

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    def hook(checkpoint, step):  # what registering does: loads a model, drawing random numbers
        torch.nn.Linear(64, 64)
        random.random(), np.random.rand()

    (tmp_path / "checkpoint-3").mkdir()
    args, state = type("Args", (), {"output_dir": str(tmp_path)})(), type("State", (), {"global_step": 3})()
    callback = _trainer_callbacks(None, hook, {"stage": "sft"})[0]
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    callback.on_save(args, state, None)
    assert draws() == expected
    assert (tmp_path / "checkpoint-3" / "dynaplan_adapter.json").is_file()


def test_batch_normalization_pulls_the_plan_decision_below_the_teachers_rate():
    from dynaplan.train.sft import loss_tokens_per_step, plan_rate_fixed_point

    # two batches of 2: one with a 50-token plan answer, one of 5-token action answers
    planned, tokens = [True, False, False, False], [55, 5, 5, 5]
    assert plan_rate_fixed_point(planned, tokens, 2, "dataset") == pytest.approx(0.25)
    # batch: the plan's batch has 60 tokens, the other 10; weights 1/60, 1/60, 1/10, 1/10
    assert plan_rate_fixed_point(planned, tokens, 2, "batch") == pytest.approx((1 / 60) / (2 / 60 + 2 / 10))
    params = parse_params({"sft": {**TINY_SFT, "batch_size": 2, "grad_accum": 3, "loss_normalization": "dataset"}})
    assert loss_tokens_per_step(params, tokens) == pytest.approx(17.5 * 2 * 3)
    assert loss_tokens_per_step(params.model_copy(update={"sft": params.sft.model_copy(update={"loss_normalization": "batch"})}), tokens) is None


def test_checkpoints_of_other_examples_or_other_training_code_are_not_resumed(tmp_path, tiny_model_dir):
    from dynaplan.train.sft import (
        ADAPTER_META, FINGERPRINT_FILE, _prepare_checkpoint_dir, base_fingerprint, run_fingerprint, training_code_digest,
    )
    from dynaplan.train.sft_data import SftExample

    params = parse_params({"sft": TINY_SFT})
    system = {"role": "system", "content": "rules"}
    examples = [SftExample([system, {"role": "user", "content": f"obs {i}"}], "Noop", "e", "crafter", i, "Noop", False)
                for i in range(3)]
    fp = run_fingerprint(params, "dynamic", examples, "base")
    assert fp == run_fingerprint(params, "dynamic", list(examples), "base", training_code_digest())
    # Same shards, other prompts (e.g. another prompt.history_len): another run.
    reworded = [examples[0], examples[1], SftExample([system, {"role": "user", "content": "obs 2, longer"}],
                                                     "Noop", "e", "crafter", 2, "Noop", False)]
    assert run_fingerprint(params, "dynamic", reworded, "base") != fp
    assert run_fingerprint(params, "dynamic", examples[::-1], "base") != fp  # the data order is the trajectory
    edited = run_fingerprint(params, "dynamic", examples, "base", code_digest="0" * 64)
    assert edited != fp

    ckpt = tmp_path / "ckpt"
    _prepare_checkpoint_dir(ckpt, fp, tiny_model_dir)
    (ckpt / "checkpoint-2").mkdir()
    (ckpt / "checkpoint-2" / "trainer_state.json").write_text("{}")
    meta = {"base_model": "tiny", "base_fingerprint": base_fingerprint(tiny_model_dir)}
    (ckpt / "checkpoint-2" / ADAPTER_META).write_text(json.dumps(meta))
    (ckpt / "checkpoint-2" / "adapter_config.json").write_text("{}")
    assert _prepare_checkpoint_dir(ckpt, fp, tiny_model_dir) == str(ckpt / "checkpoint-2")  # the same run resumes
    assert _prepare_checkpoint_dir(ckpt, edited, tiny_model_dir) is None  # after a code edit: from zero
    assert not (ckpt / "checkpoint-2").exists()
    assert json.loads((ckpt / FINGERPRINT_FILE).read_text())["fingerprint"] == edited


# ---- bad input is caught before training ----------------------------------------------------------


def test_missing_or_failed_validation_report_stops_before_training(tmp_path, tiny_model_dir):
    from dynaplan.train.sft import run_sft

    params = parse_params({"sft": TINY_SFT})
    write_teacher_dataset(tmp_path, episodes=2, steps=3, validated=False)
    with pytest.raises(SftInputError, match="failed validation"):
        run_sft(params, "dynamic", _paths(tmp_path, tiny_model_dir))
    (tmp_path / "reports" / "validate" / "summary.json").unlink()
    with pytest.raises(SftInputError, match="dvc repro validate"):
        run_sft(params, "dynamic", _paths(tmp_path, tiny_model_dir))
    assert not (tmp_path / "checkpoints").exists()


def test_an_example_longer_than_max_seq_len_is_an_error_naming_it(teacher_data, tiny_model_dir):
    from dynaplan.train.sft import run_sft

    params = parse_params({"sft": {**TINY_SFT, "max_seq_len": 40}})
    with pytest.raises(SftInputError, match=r"tokens, longer than 40 \(sft.max_seq_len\)"):
        run_sft(params, "dynamic", _paths(teacher_data, tiny_model_dir))


def test_flash_attention_without_its_package_or_a_gpu_is_an_error_before_loading(teacher_data, tiny_model_dir, monkeypatch):
    import importlib.util

    import torch

    from dynaplan.train import sft

    real_find_spec = importlib.util.find_spec
    installed = {"flash_attn": False}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (real_find_spec("json") if installed.get(name) else None) if name in installed else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = parse_params({"sft": {**TINY_SFT, "attn_implementation": "flash_attention_2"}})
    with pytest.raises(SftInputError, match=r"flash_attention_2 needs the flash-attn package .* and a CUDA GPU;.*sft.attn_implementation: sdpa"):
        sft.run_sft(params, "dynamic", _paths(teacher_data, tiny_model_dir))
    installed["flash_attn"] = True
    with pytest.raises(SftInputError, match=r"needs a CUDA GPU;"):
        sft.check_attention("flash_attention_2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sft.check_attention("flash_attention_2")  # both there: no error
    installed["flash_attn"] = False
    sft.check_attention("sdpa")


def test_an_adapter_for_another_base_model_is_refused(tmp_path, tiny_model_dir, smollm2_tokenizer_dir):
    from dynaplan.models.materialize import build_tiny_model
    from dynaplan.train.sft import ADAPTER_META, base_fingerprint, check_adapter_base

    other = build_tiny_model(tmp_path / "other", smollm2_tokenizer_dir, seed=1, num_layers=3)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / ADAPTER_META).write_text(json.dumps({"base_fingerprint": base_fingerprint(other), "base_model": "other"}))
    with pytest.raises(SftInputError, match="was trained on base model 'other'"):
        check_adapter_base(adapter, tiny_model_dir)
    assert check_adapter_base(adapter, other)["base_model"] == "other"


def test_task_exits_2_with_the_reason_when_the_dataset_is_missing(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"dir": str(tiny_model_dir)}, "sft": TINY_SFT}))
    sys.path.insert(0, str(ROOT))
    try:
        from tasks.sft import main
    finally:
        sys.path.remove(str(ROOT))
    assert main(["--variant", "naive"]) == 2


# ---- a tracked run: per-step metrics, registry, load back --------------------------------------------


@pytest.fixture(scope="module")
def tracked_run(teacher_data, tiny_model_dir):
    """One `sft@dynamic` stage on the tiny model, MLflow on SQLite in the tmp project."""
    from dynaplan.train.sft import sft_stage

    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{teacher_data / 'mlflow.db'}"
    os.environ["DYNAPLAN_ROOT"] = str(teacher_data)
    try:
        params = parse_params({"sft": {**TINY_SFT, "register_checkpoints": True}})
        paths = _paths(teacher_data, tiny_model_dir)
        out = sft_stage(params, "dynamic", paths, teacher_data / "metrics" / "sft-dynamic.json")
        yield params, paths, out
    finally:
        os.environ.pop("DYNAPLAN_ROOT", None)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def test_stage_logs_per_step_metrics_and_writes_the_metrics_file(tracked_run, teacher_data):
    import mlflow

    _, _, out = tracked_run
    written = json.loads((teacher_data / "metrics" / "sft-dynamic.json").read_text())
    assert written["model_uri"] == out["model_uri"] and written["global_step"] == 4
    for key in ("heldout_loss", "kl_to_base", "action_accuracy", "format_valid", "plan_rate", "teacher_plan_rate",
                "sampled_format_valid", "sampled_plan_rate", "sampled_action_accuracy", "valid_start_prob", "base_valid_start_prob"):
        assert isinstance(written[key], float)
    assert written["kl_to_base"] > 0  # the adapter moved the model away from its base
    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("dynaplan").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert client.get_metric_history(run.info.run_id, "heldout.kl_to_base")


def test_every_checkpoint_and_the_final_adapter_are_tagged_versions(tracked_run):
    import mlflow

    _, _, out = tracked_run
    versions = mlflow.MlflowClient().search_model_versions("name='dynaplan-agent'")
    by_step = {v.tags["global_step"]: v for v in versions}
    assert set(by_step) == {"2", "4"}  # checkpoints 2 and 4, and the final adapter at 4
    assert len(versions) == 3
    final = [v for v in versions if v.tags["final"] == "true"]
    assert len(final) == 1 and out["model_version"] == str(final[0].version)
    tags = final[0].tags
    assert tags["stage"] == "sft" and tags["variant"] == "dynamic" and tags["base_model"] == "smollm2"
    assert tags["dataset_digest"] == out["dataset_digest"] and tags["git_commit"]
    assert float(tags["sft.kl_to_base"]) == pytest.approx(out["kl_to_base"], rel=1e-4)


def test_registered_version_loads_back_with_the_same_greedy_answers(tracked_run, teacher_data):
    import mlflow

    from dynaplan import tracking
    from dynaplan.models.base import GenerationRequest, SamplingParams
    from dynaplan.models.hf import HFBackend
    from dynaplan.train.sft import load_data

    params, paths, out = tracked_run
    prompts = [ex.prompt for ex in load_data(params, "dynamic", paths).heldout[:4]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    requests = [GenerationRequest(messages=p) for p in prompts]
    in_memory = HFBackend(paths.base_dir, paths.out_dir / "adapter").generate(requests, greedy, seed=0)
    base_dir, adapter_dir = tracking.load_agent(out["model_uri"], dst=teacher_data / "downloaded")
    assert base_dir.resolve() == paths.base_dir.resolve()
    loaded = HFBackend(base_dir, adapter_dir, check_adapter_base=False).generate(requests, greedy, seed=0)
    assert [g.token_ids for g in loaded] == [g.token_ids for g in in_memory]
    pyfunc = mlflow.pyfunc.load_model(out["model_uri"])
    answers = pyfunc.predict({"messages": [json.dumps(p) for p in prompts]}, params={"max_new_tokens": 8})
    assert list(answers) == [g.text for g in in_memory]


# ---- checkpoint averaging ------------------------------------------------------------------------


def test_averaged_adapter_is_the_exact_mean_of_the_checkpoints_lora_deltas(tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel, get_peft_model

    from dynaplan.train.sft import average_checkpoints, load_base, make_lora_config

    params = parse_params({"sft": TINY_SFT})
    deltas = []
    for step in (2, 4, 6):
        model, _ = load_base(tiny_model_dir)
        peft_model = get_peft_model(model, make_lora_config(params))
        torch.manual_seed(step)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.05)
        peft_model.save_pretrained(str(tmp_path / f"checkpoint-{step}"))
        layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
        deltas.append(layer.get_delta_weight("default").detach().clone())
    model, _ = load_base(tiny_model_dir)
    last = PeftModel.from_pretrained(model, str(tmp_path / "checkpoint-6"))
    averaged, steps = average_checkpoints(last, tmp_path, 2, final_step=6)
    assert steps == [4, 6] and list(averaged.peft_config) == ["default"]
    assert averaged.peft_config["default"].r == 2 * params.sft.lora.r
    layer = averaged.base_model.model.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(layer.get_delta_weight("default"), (deltas[1] + deltas[2]) / 2, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(layer.get_delta_weight("default"), deltas[2], atol=1e-3)  # not just the last one
    model, _ = load_base(tiny_model_dir)
    with pytest.raises(RuntimeError, match=r"average_checkpoints=4 .* found steps \[2, 4, 6\]"):
        average_checkpoints(PeftModel.from_pretrained(model, str(tmp_path / "checkpoint-6")), tmp_path, 4, final_step=6)


def test_averaging_more_checkpoints_than_kept_or_saved_is_an_input_error(teacher_data, tiny_model_dir):
    from dynaplan.config import ConfigError
    from dynaplan.train.sft import check_average_checkpoints, planned_checkpoint_steps, run_sft

    with pytest.raises(ConfigError, match=r"sft.average_checkpoints=3 .* sft.save_total_limit=2"):
        parse_params({"sft": {**TINY_SFT, "average_checkpoints": 3, "save_total_limit": 2}})
    assert planned_checkpoint_steps(48, 8) == [8, 16, 24, 32, 40, 48] and planned_checkpoint_steps(5, 2) == [2, 4, 5]
    check_average_checkpoints(parse_params({"sft": {**TINY_SFT, "average_checkpoints": 3, "save_total_limit": 3}}), 5)
    params = parse_params({"sft": {**TINY_SFT, "average_checkpoints": 3, "save_total_limit": 3}})  # 4 steps, saves 2 and 4
    with pytest.raises(SftInputError, match=r"a run of 4 optimizer steps with sft.save_steps=2 saves 2 \(\[2, 4\]\)"):
        run_sft(params, "dynamic", _paths(teacher_data, tiny_model_dir))
    # Without max_steps the run's length comes from the epochs (a float) and the batches.
    params = parse_params({"sft": {**TINY_SFT, "max_steps": 0, "epochs": 1, "save_steps": 100, "average_checkpoints": 2}})
    with pytest.raises(SftInputError, match=r"a run of \d+ optimizer steps with sft.save_steps=100 saves 1 \(\[\d+\]\)"):
        run_sft(params, "dynamic", _paths(teacher_data, tiny_model_dir))


def test_stage_with_averaging_writes_the_averaged_adapter_and_measures_it(tmp_path, teacher_data, tiny_model_dir):
    import shutil

    from dynaplan.train.sft import ADAPTER_META, run_sft

    root = tmp_path / "project"
    shutil.copytree(teacher_data / "data", root / "data")
    shutil.copytree(teacher_data / "reports", root / "reports")
    params = parse_params({"sft": {**TINY_SFT, "average_checkpoints": 2}})
    result = run_sft(params, "dynamic", _paths(root, tiny_model_dir))
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    meta = json.loads((result.adapter_dir / ADAPTER_META).read_text())
    assert config["r"] == 2 * params.sft.lora.r and meta["averaged_steps"] == [2, 4] and meta["global_step"] == 4
    assert result.metrics["averaged_checkpoints"] == 2 and result.global_step == 4


# ---- resume after a kill --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_not_from_zero(tmp_path, tiny_model_dir):
    """Starts `python -m tasks.sft` in a tmp project, SIGKILLs it once checkpoint-2 is complete,
    then runs the stage again: it must resume at the saved step and finish the schedule."""
    write_teacher_dataset(tmp_path)
    settings = {**TINY_SFT, "max_steps": 30, "save_steps": 2, "save_total_limit": 30, "eval_examples": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"dir": str(tiny_model_dir)}, "sft": settings}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.sft", "--variant", "dynamic"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "checkpoints" / "sft-dynamic" / "checkpoint-2"
    deadline = time.time() + 240
    while not (checkpoint / "dynaplan_adapter.json").is_file():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoint.parent.glob("checkpoint-*"))
    assert saved and max(saved) < 30, "killed too late to test resuming"
    done = subprocess.run([sys.executable, "-m", "tasks.sft", "--variant", "dynamic"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics" / "sft-dynamic.json").read_text())
    assert metrics["global_step"] == 30
    assert metrics["resumed_from_step"] >= 2 and metrics["resumed_from_step"] in saved
    state = json.loads((checkpoint.parent / "checkpoint-30" / "trainer_state.json").read_text())
    losses = [h["step"] for h in state["log_history"] if "loss" in h]
    assert losses[0] <= 2 and losses[-1] == 30  # the history carries on from the checkpoint
