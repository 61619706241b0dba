"""A bad config value or an unknown key fails at once, in one line that names the key, the value
and the fix: configs are only composed here, nothing is trained or tokenized."""

import re
import subprocess
import sys
from functools import partial

import pytest
from helpers import REPO
from hydra import compose, initialize_config_module
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from omegaconf import DictConfig, OmegaConf

from losslab import checkpointing
from losslab.checkpointing import LastCheckpoint
from losslab.config_checks import FIXED_VOCAB_SIZES, ConfigError, check_config
from losslab.config_keys import check_overrides
from losslab.data import DataConfig
from losslab.generate import main as generate_main
from losslab.losses import LOSSES
from losslab.model import GPTConfig
from losslab.optimization import ScheduleConfig, StepConfig
from losslab.tokenizers import TOKENIZERS, build_tokenizer

GENERATE = REPO / "scripts" / "generate.py"
PRESETS = [
    [],
    ["experiment=tiny"],
    ["experiment=shakespeare_gpt2"],
    ["trainer=ddp"],
    ["trainer=tp"],
    ["trainer=fsdp_tp", "loss=logsumexp"],
    ["precision=bf16"],
    ["tokenizer=gpt2"],
    ["tokenizer=bytes"],
    ["tokenizer=bytes", "data.vocab_size=257"],
    ["model=gpt2", "tokenizer=gpt2"],
    ["data=shakespeare"],
    ["data=text", "data.path=x"],  # data.path is the data module's to check, when it reads it
    ["data.mode=padded", "data.val_batches=20", "step.gradient_clip_val=null", "step.nonfinite=stop"],
    ["trainer.devices=auto"],
    ["trainer.devices=-1"],
    ["+callbacks.more_stats._target_=losslab.callbacks.StepStats"],
    *[[f"loss={name}"] for name in LOSSES],
]


def compose_config(*overrides: str) -> DictConfig:
    """conf/train.yaml with ``overrides``, composed as ``python train.py`` would, outside a run
    (so ``${hydra:runtime.output_dir}`` cannot be resolved)."""
    with initialize_config_module(config_module="losslab.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("overrides", PRESETS, ids=" ".join)
def test_the_defaults_and_every_preset_pass(overrides):
    loss = next((override.removeprefix("loss=") for override in overrides if override.startswith("loss=")), None)
    if loss in LOSSES and LOSSES[loss].unavailable_reason():  # the check builds the loss: refused here
        with pytest.raises(ConfigError, match=f"loss {loss!r} cannot run here"):
            check_config(compose_config(*overrides))
        return
    check_config(compose_config(*overrides))


def test_every_multi_process_preset_trains_on_the_same_global_batch():
    """experiment=tiny ends at the same validation loss under each (README, "Beyond one device"): a
    step's rows are data-parallel ranks x data.batch_size x step.accumulate, 2 x 4 x 1 or 1 x 4 x 2."""

    def rows_per_step(trainer: str) -> int:
        cfg = compose_config("experiment=tiny", f"trainer={trainer}")
        data_parallel = cfg.trainer.devices // cfg.trainer.strategy.get("tensor_parallel_size", 1)
        return data_parallel * cfg.data.batch_size * cfg.step.accumulate

    assert {trainer: rows_per_step(trainer) for trainer in ("ddp", "fsdp", "tp", "fsdp_tp")} == dict.fromkeys(
        ("ddp", "fsdp", "tp", "fsdp_tp"), 8
    )


def test_an_existing_checkpoint_path_passes(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.touch()
    check_config(compose_config(f"ckpt_path={checkpoint}"))


BAD = [
    (
        "optimizer.lr=-0.01",
        re.escape(
            "optimizer.lr=-0.01: the learning rate must be > 0 and finite in float32, the weights' dtype "
            "(at most 3.4e+38) (e.g. optimizer.lr=3e-3)"
        ),
    ),
    # beyond float32's range, the weights' dtype: NaN weights at the first step
    ("optimizer.lr=inf", r"optimizer.lr=inf: the learning rate must be > 0 and finite in float32"),
    ("optimizer.lr=1e308", r"optimizer.lr=1e\+308: the learning rate must be > 0 and finite in float32"),
    ("optimizer.lr=nan", r"optimizer.lr=nan: the learning rate must be > 0"),
    ("optimizer.weight_decay=inf", r"optimizer.weight_decay=inf: the weight decay must be a finite number >= 0"),
    (
        "loss.softcap=nan",
        re.escape("loss.softcap=nan: must be a finite number > 0, or null to turn it off (e.g. loss.softcap=30)"),
    ),
    ("loss.softcap=inf", re.escape("loss.softcap=inf: must be a finite number > 0")),
    # Python's spelling of null is a string to Hydra: named, not a TypeError from a comparison
    ("loss.softcap=None", re.escape("loss.softcap=None: must be a finite number > 0, or null to turn it off")),
    ("loss.z_loss=nan", re.escape("loss.z_loss=nan: must be a finite number >= 0 (0: none) (e.g. loss.z_loss=1e-4)")),
    ("loss.z_loss=abc", re.escape("loss.z_loss=abc: must be a finite number >= 0")),
    (
        "step.gradient_clip_val=inf",
        r"step.gradient_clip_val=inf: the clipping norm must be a finite number > 0, or null for no clipping",
    ),
    (
        "callbacks.spike_capture.k=nan",
        re.escape(
            "callbacks.spike_capture.k=nan: a spike is the loss above the mean by k standard deviations: a finite "
            "number > 0 (e.g. callbacks.spike_capture.k=6)"
        ),
    ),
    ("callbacks.spike_capture.window=1", r"callbacks.spike_capture.window=1: .* an int >= 2"),
    ("callbacks.spike_capture.max_files=-1", r"callbacks.spike_capture.max_files=-1: the spike files kept at most"),
    (
        "callbacks.last_checkpoint.every_n_train_steps=0",
        re.escape(
            "callbacks.last_checkpoint.every_n_train_steps=0: last.ckpt is written every this many steps (and at "
            "the end): an int >= 1 (e.g. callbacks.last_checkpoint.every_n_train_steps=50)"
        ),
    ),
    ("seed=-1", re.escape("seed=-1: the seed must be an int from 0 to 4294967295 (numpy's seeds) (e.g. seed=1337)")),
    ("seed=4294967296", r"seed=4294967296: the seed must be an int from 0 to 4294967295"),
    (
        "trainer.precision=banana",
        r"trainer.precision=banana: Lightning's precision must be one of .*bf16-mixed, 32-true.* \(e.g. precision=bf16\)",
    ),
    ("trainer.accelerator=banana", r"trainer.accelerator=banana: the accelerator must be one of auto, cpu, gpu, cuda"),
    ("data.batch_size=1e8", r"data.batch_size=100000000.0: the batch size must be an int >= 1"),
    (
        "model.context_length=1e8",
        re.escape("model.context_length=100000000.0: must be an int >= 1 (e.g. model.context_length=128)"),
    ),
    ("data=text", re.escape("data.path=???: data=text reads your own files: give data.path=<a file, a folder of")),
    ("data=jsonl data.path=null", r"data.path=null: data=jsonl reads your own files"),
    (
        "optimizer.weight_decay=-0.1",
        r"optimizer.weight_decay=-0.1: the weight decay must be a finite number >= 0 .*\(e.g. optimizer.weight_decay=0.1\)",
    ),
    ("optimizer.betas=[0.9,1.0]", re.escape("optimizer.betas=[0.9, 1.0]: the betas must be two numbers in [0, 1)")),
    ("data.batch_size=0", r"data.batch_size=0: the batch size must be an int >= 1 .*\(e.g. data.batch_size=16\)"),
    ("model.context_length=0", r"model.context_length=0: must be an int >= 1"),
    ("model.n_layer=0", r"model.n_layer=0: must be an int >= 1"),
    ("model.n_head=0", r"model.n_head=0: must be an int >= 1"),
    ("model.n_embd=0", r"model.n_embd=0: must be an int >= 1"),
    (
        "model.n_embd=130",
        re.escape(
            "model.n_embd=130 is not a multiple of n_head=4: each head takes n_embd / n_head dimensions (e.g. n_embd=128)"
        ),
    ),
    ("model.dropout=1.0", re.escape("model.dropout=1.0: must be in [0, 1)")),
    ("data.context_length=0", r"data.context_length=0: the rows' length must be an int >= 1"),
    (
        "data.context_length=256",
        re.escape(
            "data.context_length=256 is longer than model.context_length=128: use data.context_length<=128 or a model with a longer context (model.context_length=256)"
        ),
    ),
    ("trainer.max_steps=0", r"trainer.max_steps=0: the run must train an int >= 1 steps"),
    (
        "trainer.val_check_interval=0.5",
        r"trainer.val_check_interval=0.5: validation runs every this many steps: an int >= 1",
    ),
    ("trainer.log_every_n_steps=0", r"trainer.log_every_n_steps=0: logging runs every this many steps: an int >= 1"),
    ("trainer.devices=0", r"trainer.devices=0: the number of devices must be >= 1"),
    ("schedule.warmup_steps=-1", r"schedule.warmup_steps=-1: the warm-up must be an int >= 0 steps"),
    (
        "schedule.min_lr_ratio=1.5",
        re.escape("schedule.min_lr_ratio=1.5: the final learning rate's share of optimizer.lr must be in [0, 1]"),
    ),
    ("step.accumulate=0", r"step.accumulate=0: a step must take an int >= 1 micro-batches"),
    ("schedule.total_steps=0", r"schedule.total_steps=0: the schedule's length must be an int >= 1 steps, or null"),
    ("keep_checkpoints=all", r"keep_checkpoints=all: the checkpoints to keep must be one of both, last, best"),
    (
        "callbacks.model_checkpoint.keep=all",  # built here, as losslab's callbacks are: once a traceback at the fit
        r"callbacks.model_checkpoint.keep=all: the checkpoints to keep must be one of both, last, best",
    ),
    # named by the key given, not data.cache_dir, which takes its value (${paths.cache_dir})
    (
        "paths.cache_dir=null",
        re.escape("paths.cache_dir=null: the cache must be a folder's path (e.g. paths.cache_dir="),
    ),
    ("data.cache_dir=null", re.escape("data.cache_dir=null: the cache must be a folder's path")),
    ("branch=maybe", r"branch=maybe: branch must be true or false"),
    (
        "data=shakespeare data.max_document_chars=0",
        r"data.max_document_chars=0: a document's longest piece must be an int >= 1",
    ),
    ("step.gradient_clip_val=0", r"step.gradient_clip_val=0: the clipping norm must be a finite number > 0, or null"),
    ("step.nonfinite=ignore", r"step.nonfinite=ignore: a non-finite step must skip or stop"),
    ("data.val_fraction=1.0", re.escape("data.val_fraction=1.0: the validation share must be in (0, 1)")),
    ("data.val_batches=0", r"data.val_batches=0: the validation batches must be an int >= 1, or null"),
    ("data.mode=stacked", r"data.mode=stacked: the mode must be one of packed, padded"),
    ("data.corpus=wiki", r"data.corpus=wiki: the corpus must be one of pydoc, shakespeare, text"),
    ("data.tokenizer=sentencepiece", r"data.tokenizer=sentencepiece: the tokenizer must be one of gpt2, bpe, bytes"),
    (
        "tokenizer=bytes data.vocab_size=1000",
        re.escape("data.vocab_size=1000 does not apply to tokenizer=bytes, which has 257 tokens: drop data.vocab_size"),
    ),
    (
        "tokenizer=gpt2 data.vocab_size=4096",
        re.escape(
            "data.vocab_size=4096 does not apply to tokenizer=gpt2, which has 50257 tokens: drop data.vocab_size"
        ),
    ),
    ("data.vocab_size=100", r"data.vocab_size=100: tokenizer=bpe needs an int >= 257 .*\(e.g. data.vocab_size=4096\)"),
    ("data.vocab_size=null", r"data.vocab_size=null: tokenizer=bpe needs an int >= 257"),
    (
        "loss.ignore_index=7",
        re.escape(
            "loss.ignore_index=7 is a token of the vocabulary (ids 0 to 4095): its real targets would be ignored too; use a negative id (e.g. loss.ignore_index=-100)"
        ),
    ),
    ("loss.name=nope", re.escape(f"loss.name=nope: no such loss: choose one of {', '.join(LOSSES)}")),
    ("loss.label_smoothing=2.0", re.escape("loss.label_smoothing=2.0: must be a number in [0, 1] (0: none)")),
    (
        "+loss.chunk_size=64",
        r"loss.chunk_size=64: loss 'cross_entropy' has no option chunk_size; it takes check_targets, ",
    ),
    (
        "ckpt_path=nope/last.ckpt",
        re.escape(
            "ckpt_path=nope/last.ckpt: no such file (or not a regular file): give the path of a checkpoint (e.g. ckpt_path=logs/runs/<run>/checkpoints/last.ckpt)"
        ),
    ),
    ("+model.n_layr=2", re.escape("model.n_layr=2: GPTConfig has no option n_layr; did you mean model.n_layer?")),
    (
        "+optimizer.weight_decy=0.1",
        re.escape("optimizer.weight_decy=0.1: AdamW has no option weight_decy; did you mean optimizer.weight_decay?"),
    ),
    (
        "+trainer.max_step=5",
        re.escape("trainer.max_step=5: Trainer has no option max_step; did you mean trainer.max_steps?"),
    ),
    (
        "+data.batchsize=8",
        re.escape("data.batchsize=8: DataConfig has no option batchsize; did you mean data.batch_size?"),
    ),
    ("+step.acumulate=2", re.escape("step.acumulate=2: step has no option acumulate; did you mean step.accumulate?")),
    (
        "+callbacks.rng_state.seed=1",
        re.escape("callbacks.rng_state.seed=1: RNGState has no option seed; it takes no options"),
    ),
    (
        "trainer=fsdp trainer.precision=64-true",
        r"trainer.precision=64-true: FSDP \(trainer=fsdp, tp, fsdp_tp\) takes 32-true",
    ),
    *[
        (
            f"trainer={trainer} loss={name}",
            rf"loss={name} cannot train under tensor parallelism \(trainer.strategy.tensor_parallel_size=2: "
            r"trainer=tp or fsdp_tp\).*: use loss=logsumexp, cross_entropy or fused",
        )
        for trainer in ("tp", "fsdp_tp")
        for name, loss in LOSSES.items()
        if not loss.takes_vocab_parallel  # every other entry, each under both
    ],
    ("trainer=tp trainer.devices=3", r"trainer.devices=3 x trainer.num_nodes=1 processes do not split into tensor-"),
    (
        "trainer=fsdp_tp model.n_head=2 model.n_embd=32 trainer.strategy.tensor_parallel_size=4",
        re.escape(
            "model.n_head=2 heads do not split over trainer.strategy.tensor_parallel_size=4 processes (trainer=tp"
        )
        + r".*\(e.g. model.n_head=4\) or fewer processes",
    ),
    # the heads suggested divide the width too (3 -> 2: 4 does not divide 102), or come with a width they divide
    (
        "trainer=tp model.n_head=3 model.n_embd=102",
        r"model.n_head=3 heads do not split.*\(e.g. model.n_head=2\) or fewer processes",
    ),
    (
        "trainer=tp model.n_head=3 model.n_embd=99",
        r"model.n_head=3 heads do not split.*\(e.g. model.n_head=4 model.n_embd=100\) or fewer processes",
    ),
    ("trainer=tp +loss.vocab_parallel=1", r"loss.vocab_parallel=1: losslab sets this itself: trainer=tp and fsdp_tp"),
    ("+loss.class_weights=[1.0,2.0]", r"loss.class_weights=\[1.0, 2.0\]: training takes no class weights"),
    ("+model.vocab_size=1000", r"model.vocab_size=1000: losslab sets this itself: the tokenizer sets it"),
    (
        "+trainer.gradient_clip_val=1.0",
        r"trainer.gradient_clip_val=1.0: losslab sets this itself: .*use step.gradient_clip_val",
    ),
]


@pytest.mark.parametrize(
    "overrides,message",
    # the refusal of an unknown loss lists every loss
    [
        pytest.param(*case, id=case[0], marks=[pytest.mark.whole_registry] * case[0].startswith("loss.name="))
        for case in BAD
    ],
)
def test_a_bad_value_or_key_is_one_line_naming_it_and_the_fix(overrides, message):
    cfg = compose_config(*overrides.split())
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert re.match(message, str(error.value)), str(error.value)
    assert "\n" not in str(error.value)


# A value is checked once, by the component that takes it: the config's refusal is the component's own,
# under the node's path. (override, node, the component built from its keyword arguments, those arguments)
ONE_PLACE = [
    ("data.batch_size=0", "data", DataConfig, {"batch_size": 0}),
    ("data.vocab_size=300.5", "data", DataConfig, {"vocab_size": 300.5}),  # the tokenizer's settings
    ("schedule.min_lr_ratio=-1", "schedule", ScheduleConfig, {"min_lr_ratio": -1}),
    ("step.gradient_clip_val=-1", "step", StepConfig, {"gradient_clip_val": -1}),
    (
        "callbacks.last_checkpoint.every_n_train_steps=-1",
        "callbacks.last_checkpoint",
        partial(LastCheckpoint, dirpath=None),
        {"every_n_train_steps": -1},
    ),
    ("model.n_head=3", "model", partial(GPTConfig, vocab_size=1), {"n_head": 3}),
]


@pytest.mark.parametrize("override,node,build,options", ONE_PLACE, ids=[case[0] for case in ONE_PLACE])
def test_a_value_is_refused_by_the_component_that_takes_it(override, node, build, options):
    with pytest.raises(ValueError) as own:
        build(**options)
    with pytest.raises(ConfigError) as config:
        check_config(compose_config(override))
    assert str(config.value) == f"{node}.{own.value}"


def test_a_top_level_key_that_a_component_reads_is_refused_by_the_component_under_the_keys_name(monkeypatch):
    """keep_checkpoints is the checkpoint callbacks' keep (``${keep_checkpoints}``): their refusal, named as
    the user sets it; a value they come to take is not refused by a copy of their rule here."""
    with pytest.raises(ValueError) as own:
        LastCheckpoint(dirpath=None, every_n_train_steps=1, keep="all")
    with pytest.raises(ConfigError) as config:
        check_config(compose_config("keep_checkpoints=all"))
    assert str(config.value) == f"keep_checkpoints{str(own.value).removeprefix('keep')}"
    assert str(config.value) == (
        "keep_checkpoints=all: the checkpoints to keep must be one of both, last, best (e.g. keep_checkpoints=last)"
    )
    monkeypatch.setattr(checkpointing, "KEEP", (*checkpointing.KEEP, "all"))
    check_config(compose_config("keep_checkpoints=all"))


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_an_accelerator_this_machine_lacks_is_refused_before_any_data_work(monkeypatch, accelerator):
    cfg = compose_config(f"trainer.accelerator={accelerator}")
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    check_config(cfg)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    with pytest.raises(
        ConfigError, match=rf"^trainer.accelerator={accelerator}: no {accelerator.upper()} is available"
    ):
        check_config(cfg)


def test_a_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_every_tokenizer_has_a_known_vocabulary(tiktoken_cache):
    assert set(FIXED_VOCAB_SIZES) == set(TOKENIZERS) - {"bpe"}
    for name, size in FIXED_VOCAB_SIZES.items():
        assert build_tokenizer(name).n_vocab == size


def test_check_overrides_suggests_the_key_meant():
    assert check_overrides(["model.n_layr=2"]) == (
        "unknown config key model.n_layr (in model.n_layr=2): did you mean model.n_layer? "
        "(python train.py --cfg job lists every key)"
    )
    assert "did you mean model.n_layer?" in check_overrides(["modle.n_layer=2"])
    assert "did you mean trainer.max_steps?" in check_overrides(["-m", "trainer.max_step=5,10"])
    assert check_overrides(["seed=1", "foo=1"]) == (
        "unknown config key foo (in foo=1): python train.py --cfg job lists every key"
    )


@pytest.mark.whole_registry
def test_check_overrides_suggests_the_group_choice_meant():
    losses = ", ".join(sorted(LOSSES))
    assert check_overrides(["loss=fusd"]) == (
        f"unknown loss choice fusd (in loss=fusd): did you mean loss=fused? (or one of {losses})"
    )
    assert check_overrides(["-m", "loss=naive,fusd"]).startswith("unknown loss choice fusd (in loss=naive,fusd)")
    assert check_overrides(["data=txt"]).startswith("unknown data choice txt (in data=txt): did you mean data=text?")
    assert (
        check_overrides(["precision=zzz"])
        == "unknown precision choice zzz (in precision=zzz): choose one of bf16, fp32"
    )


def test_check_overrides_passes_what_hydra_handles():
    overrides = [
        "loss=fused",
        "loss.chunk_size=64",
        "loss=naive,fused",
        "hydra/launcher=slurm",
        "experiment=tiny",
        "experiment=null",
        "loss=choice(naive,fused)",
        "trainer.max_steps=5",
        "seed=3",
        "hydra.run.dir=x",
        "+foo=1",
        "++trainer.foo=1",
        "~callbacks.progress_bar",
        "-m",
        "--multirun",
        "--cfg",
        "job",
        "--info",
        "defaults",
        "trainer.strategy.process_group_backend=nccl",  # nested, in trainer/ddp.yaml
        "trainer.precision=bf16-mixed",  # `# @package trainer` in precision/
        "data.vocab_size=8192",
        "data.ranks_path=x",  # `# @package data` in tokenizer/
    ]
    assert check_overrides(overrides) is None
    assert check_overrides(["--config-dir", "mine", "mine.key=1"]) is None  # other configs: not ours to know


@pytest.mark.parametrize("overrides", [p for p in PRESETS if not any(o.startswith("+") for o in p)], ids=" ".join)
def test_check_overrides_knows_every_key_of_the_composed_config(overrides):
    keys = leaf_keys(OmegaConf.to_container(compose_config(*overrides), resolve=False))
    assert check_overrides([f"{key}=1" for key in keys]) is None


def leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        keys += leaf_keys(value, path) if isinstance(value, dict) else [path]
    return keys


@pytest.mark.parametrize(
    "argument,value,message",
    [
        ("--temperature", "-1", "must be >= 0, got -1"),
        ("--temperature", "nan", "must be >= 0, got nan"),
        ("--max-new-tokens", "-5", "must be >= 1, got -5"),
        ("--max-new-tokens", "0", "must be >= 1, got 0"),
        ("--max-new-tokens", "1000000000000", "must be <= 1,000,000, got 1000000000000"),
        ("--num-samples", "1000000000000", "must be <= 10,000, got 1000000000000"),
        ("--num-samples", "0", "must be >= 1, got 0"),
        ("--top-k", "-3", "must be >= 0, got -3"),
        ("--top-k", "x", "invalid int value: 'x'"),
    ],
)
def test_generate_refuses_bad_arguments(monkeypatch, capsys, argument, value, message):
    monkeypatch.setattr(sys, "argv", ["generate.py", "x.ckpt", argument, value])
    with pytest.raises(SystemExit) as exit:
        generate_main()
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"generate.py: error: argument {argument}: {message}"


def test_generate_checks_its_arguments_before_loading_the_checkpoint():
    command = [sys.executable, str(GENERATE), "x.ckpt", "--temperature", "-1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == "generate.py: error: argument --temperature: must be >= 0, got -1"
