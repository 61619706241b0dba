"""End-to-end: every config option composes, and a few-step run per loss trains and logs."""

import re

import pytest
import torch
from helpers import CONF, make_config, scalars
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from losslab.checkpoint_files import load_model
from losslab.generate import generate
from losslab.losses import LOSSES
from losslab.model import GPT
from losslab.run_status import Status
from losslab.train import build_module, train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [
        (g, o)
        for g in ["data", "tokenizer", "model", "loss", "precision", "optimizer", "trainer", "logger", "callbacks"]
        for o in options(g)
    ],
)
def test_every_config_option_composes_and_instantiates(tmp_path, cache_dir, group, option):
    overrides = [f"{group}={option}"]
    if option == "text":
        overrides.append(f"data.path={CONF / 'train.yaml'}")
    cfg = make_config(tmp_path, cache_dir, overrides)
    if group == "tokenizer":
        assert cfg.data.tokenizer == option
    elif group == "data":
        assert cfg.data.corpus == option
    elif group == "loss":
        if LOSSES[option].unavailable_reason():  # composed above; built where it can run
            pytest.skip(f"{option}: {LOSSES[option].unavailable_reason()}")
        assert type(instantiate(cfg.loss)()) is LOSSES[option]
    elif group in {"model", "optimizer"}:
        built = GPT(instantiate(cfg.model, vocab_size=11))
        if group == "optimizer":
            instantiate(cfg.optimizer)(built.parameters())
    elif group in {"trainer", "precision"}:
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    elif group in {"logger", "callbacks"}:
        [instantiate(c) for c in cfg.callbacks.values()] if group == "callbacks" else instantiate(cfg.logger)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_few_steps_per_loss_write_tensorboard_curves(tmp_path, cache_dir, loss):
    if LOSSES[loss].unavailable_reason():
        pytest.skip(f"{loss}: {LOSSES[loss].unavailable_reason()}")
    # spike capture compares from step 3 on: a run that learns leaves no spikes/ (tests/test_spikes.py provokes one)
    metrics = train(make_config(tmp_path, cache_dir, [f"loss={loss}", "callbacks.spike_capture.warmup=2"])).metrics
    curves = scalars(tmp_path / "run")
    tags = ["train/loss", "train/ppl", "val/loss", "val/ppl", "val/bpb", "lr", "train/grad_norm", "perf/tokens_per_sec"]
    for tag in tags + (["train/acc", "val/acc"] if LOSSES[loss].gives_predictions else []):
        assert tag in curves, tag
    assert len(curves["val/loss"]) == 3  # before training, and every 3 steps
    assert curves["val/ppl"][-1] < curves["val/ppl"][0]
    assert metrics["val/loss"] == pytest.approx(curves["val/loss"][-1])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "spikes").exists()


def test_bf16_and_padded_mode_train(tmp_path, cache_dir):
    metrics = train(
        make_config(tmp_path, cache_dir, ["precision=bf16", "data.mode=padded", "loss=fused", "loss.z_loss=1e-4"])
    ).metrics
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert "train/z_loss" in scalars(tmp_path / "run")


def test_another_ignore_index_pads_with_it_and_trains_the_same(tmp_path, cache_dir):
    padded = ["data.mode=padded", "trainer.max_steps=3"]
    expected = train(make_config(tmp_path / "default", cache_dir, padded)).metrics
    cfg = make_config(tmp_path / "other", cache_dir, [*padded, "loss.ignore_index=-1"])
    datamodule, _ = build_module(cfg)
    [batch] = next(iter(datamodule.train_dataloader()))
    assert (batch["targets"][batch["attention_mask"] == 0] == -1).all()
    assert train(cfg).metrics["val/loss"] == expected["val/loss"]


def test_resume_continues_from_the_checkpoint(tmp_path, cache_dir):
    train(make_config(tmp_path / "first", cache_dir, []))
    last = tmp_path / "first" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    train(
        make_config(
            tmp_path / "resumed", cache_dir, ["trainer.max_steps=9", "schedule.total_steps=6", f"ckpt_path={last}"]
        )
    )
    resumed = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 9
    steps = EventAccumulator(str(tmp_path / "resumed" / "run"))
    steps.Reload()
    assert [e.step for e in steps.Scalars("train/loss")] == [7, 8, 9]  # continued, not restarted


def test_generation_from_a_checkpoint(tmp_path, cache_dir):
    train(make_config(tmp_path, cache_dir, []))
    model, tokenizer = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    samples = generate(model, tokenizer, "The ", max_new_tokens=20, num_samples=2)
    assert len(samples) == 2 and all(s.startswith("The ") for s in samples)
    assert generate(model, tokenizer, "The ", max_new_tokens=20, seed=3) == generate(
        model, tokenizer, "The ", max_new_tokens=20, seed=3
    )


@pytest.mark.whole_registry
def test_unknown_loss_and_too_long_context_are_clear_errors(tmp_path, cache_dir):
    with pytest.raises(ValueError, match=re.escape(f"loss.name=nope: no such loss: choose one of {', '.join(LOSSES)}")):
        train(make_config(tmp_path, cache_dir, ["loss.name=nope"]))
    with pytest.raises(ValueError, match="loss.bogus=1: loss 'cross_entropy' has no option bogus"):
        train(make_config(tmp_path, cache_dir, ["+loss.bogus=1"]))
    with pytest.raises(ValueError, match="data.context_length=64 is longer than model.context_length=32"):
        train(make_config(tmp_path, cache_dir, ["data.context_length=64"]))


def test_weight_decay_from_the_optimizer_config_reaches_matrices_only(tmp_path, cache_dir):
    _, module = build_module(make_config(tmp_path, cache_dir, ["optimizer.weight_decay=0.05"]))
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_compiled_blocks_train_with_the_fused_loss_and_keep_their_names(tmp_path, cache_dir):
    """model.compile=true compiles the transformer blocks; fused's autograd.Function stays outside."""
    outcome = train(make_config(tmp_path, cache_dir, ["model.compile=true", "loss=fused", "trainer.max_steps=2"]))
    assert outcome.status is Status.FINISHED
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "model.blocks.0.attn.qkv.weight" in state  # no _orig_mod: checkpoints and export read it
