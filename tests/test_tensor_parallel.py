"""Tensor-parallel training (``trainer=tp``, ``trainer=fsdp_tp``): the LM head split by vocabulary rows
and the blocks by the column/row plan take the steps one device takes, each process holds its share,
the parameters a tensor-parallel group holds in common stay equal on its processes, and a run's
checkpoints are whole files that resume exactly after a kill and serve generate and export.

The steps: ``python tests/steps.py OUT_DIR tp`` on 4 processes (``fsdp_tp``: 2 data-parallel x 2
tensor-parallel; ``tp``: all 4 share the vocabulary), against the same steps on one device, where
each step is the union of the data-parallel ranks' batches (as ``test_fsdp.py`` does for DDP). Each
loss's own sharded arithmetic is ``tests/losses/test_vocab_parallel.py``'s.
"""

import subprocess
import sys

import pytest
import torch
from helpers import (
    NO_BIAS,
    STEPS_SCRIPT,
    assert_generate_and_export_read,
    assert_logged_and_checkpointed_once,
    assert_same_optimizer_state,
    assert_same_run,
    assert_validates_as_one_device,
    kill_after_checkpoint,
    last_checkpoint,
    relative_difference,
    run,
)
from steps import (
    TENSOR_PARALLEL_RUNS,
    VOCAB,
    StepMetrics,
    fit,
    parameters_of,
    sharded_runs,
    tensor_parallel_steps,
    tiny_module,
)

RANKS = 4
TENSOR_PARALLEL_GROUPS = {"tp": [[0, 1, 2, 3]], "fsdp_tp": [[0, 1], [2, 3]]}  # the mesh is (data, tensor)
# test_resume's runs (dropout, last.ckpt every 3 steps), shorter: killed after step 3, resumed to 6
STEPS = 6
TP = ["trainer=tp", *NO_BIAS, f"trainer.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[dict]:
    """Each rank's results of ``python tests/steps.py OUT_DIR tp`` (see ``steps.tensor_parallel_run``)."""
    out = tmp_path_factory.mktemp("tensor_parallel")
    done = subprocess.run(
        [sys.executable, str(STEPS_SCRIPT), str(out), "tp"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [torch.load(out / f"tensor-parallel-rank{rank}.pt") for rank in range(RANKS)]


@pytest.fixture(scope="module")
def one_device() -> dict[str, dict]:
    """The same steps on one device: each step the union of the data-parallel ranks' batches."""
    _, merged = tensor_parallel_steps()
    runs = sharded_runs(tensor_parallel=True)
    runs["bf16-in-float64"] = (runs["bf16"][0], runs["fused"][1])  # what bf16 rounds
    results = {}
    for run_name, (module_options, numbers) in runs.items():
        if run_name in TENSOR_PARALLEL_RUNS or run_name == "bf16-in-float64":
            module = tiny_module(**module_options).to(numbers["dtype"])
            metrics = StepMetrics()
            trainer = fit(module, merged, precision=numbers["precision"], callbacks=[metrics])
            results[run_name] = {
                "steps": metrics.steps,
                "parameters": parameters_of(module),
                "optimizer_state": trainer.optimizers[0].state_dict(),
                "state_dict": module.state_dict(),
            }
    return results


def runs_and_strategies():
    return [(run_name, strategy) for run_name, strategies in TENSOR_PARALLEL_RUNS.items() for strategy in strategies]


@pytest.mark.parametrize("run_name, strategy", [run for run in runs_and_strategies() if run[0] != "bf16"])
def test_the_steps_of_one_device(sharded, one_device, run_name, strategy):
    """Float64 SGD, and AdamW with clipping that bites: to 1e-12."""
    expected = one_device[run_name]
    steps = torch.tensor(expected["steps"], dtype=torch.float64)  # loss and gradient norm per step
    assert len(expected["steps"]) == 3
    for results in sharded:
        got = results[run_name, strategy]
        assert relative_difference(got["parameters"], expected["parameters"]) < 1e-12
        assert relative_difference(torch.tensor(got["steps"], dtype=torch.float64), steps) < 1e-12


def test_bf16_steps_round_about_as_one_devices_do(sharded, one_device):
    """Under bf16 autocast each process rounds its part of the hidden states' gradient to bf16 before
    the group sums them (as Megatron's tensor parallelism does): one rounding more than one device's.
    After 3 steps the sharded run is no further from the float64 steps than one device's bf16 run
    is, times 2 (measured: 0.6e-3 of the largest weight apart, each about 1e-3 from float64)."""
    exact = one_device["bf16-in-float64"]["parameters"]
    one_device_error = relative_difference(one_device["bf16"]["parameters"].double(), exact)
    assert 1e-4 < one_device_error < 1e-2
    for strategy in TENSOR_PARALLEL_RUNS["bf16"]:
        for results in sharded:
            got = results["bf16", strategy]["parameters"].double()
            assert relative_difference(got, exact) < 2 * one_device_error


# the block's parameters that the column/row plan splits over a tensor-parallel group; the rest it replicates
SPLIT = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight"}


@pytest.mark.parametrize("run_name, strategy", runs_and_strategies())
def test_each_process_holds_its_share_and_the_replicas_stay_equal(sharded, run_name, strategy):
    """The head's rows split over the 4 processes (tp: 10, 10, 10, 7 of 37; fsdp_tp: FSDP's half of
    each tensor-parallel half); each process holds a quarter of the block's split layers (its heads,
    its share of the MLP: by tensor parallelism, and by FSDP under fsdp_tp); the parameters a
    tensor-parallel group holds in common (LayerNorms, the row-split layers' biases) hold the same
    values on its processes, and so the processes compute the same activations."""
    heads = [results[run_name, strategy]["head"] for results in sharded]
    assert sum(head.shape[0] for head in heads) == VOCAB
    assert max(head.shape[0] for head in heads) == -(-VOCAB // RANKS)
    whole = dict(tiny_module(n_head=4).model.blocks[0].named_parameters())
    for group in TENSOR_PARALLEL_GROUPS[strategy]:
        blocks = [sharded[rank][run_name, strategy]["block"] for rank in group]
        assert set(blocks[0]) >= SPLIT
        for name, expected in whole.items():
            pieces = RANKS if name in SPLIT else RANKS // len(group)  # the processes holding different ones
            assert all(block[name].numel() * pieces == expected.numel() for block in blocks), name
            assert (name in SPLIT) != all(torch.equal(block[name], blocks[0][name]) for block in blocks), name


def test_a_checkpoint_holds_the_optimizer_state_as_one_device_numbers_it(sharded, one_device):
    for strategy in TENSOR_PARALLEL_RUNS["adamw_clipped"]:
        got = sharded[0]["adamw_clipped", strategy]["optimizer_state"]
        assert_same_optimizer_state(got, one_device["adamw_clipped"]["optimizer_state"])


def test_a_checkpoint_read_back_under_fsdp_tp_gives_each_process_its_shards(sharded):
    """The adamw_clipped run's checkpoint, read into a fresh fsdp_tp module (the head of 37 rows split
    unevenly over 2 x 2: 10, 9, 9, 9), gathers back to the same weights and AdamW moments, to the bit."""
    results = sharded[0]["adamw_clipped", "fsdp_tp"]
    reloaded = results["reloaded"]
    assert reloaded["state_dict"].keys() == results["state_dict"].keys()
    for name, value in results["state_dict"].items():
        assert torch.equal(reloaded["state_dict"][name], value), name
    got, saved = reloaded["optimizer_state"], results["optimizer_state"]
    assert got["param_groups"] == saved["param_groups"] and got["state"].keys() == saved["state"].keys()
    for param_id, state in saved["state"].items():
        assert all(torch.equal(got["state"][param_id][key], value) for key, value in state.items()), param_id


@pytest.mark.parametrize("run_name, strategy", [("fused", "tp"), ("adamw_clipped", "fsdp_tp")])
def test_a_checkpoint_holds_the_weights_as_one_device_has_them(sharded, one_device, run_name, strategy):
    """Every weight whole and in the model's order (the attention's q, k and v rows, which the split
    holds by process, too), so that every other strategy, generate.py and export.py read it."""
    got, expected = sharded[0][run_name, strategy]["state_dict"], one_device[run_name]["state_dict"]
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert relative_difference(got[name], value) < 1e-12 if value.is_floating_point() else got[name] == value, name


@pytest.fixture(scope="module")
def tp_run(root) -> str:
    run(root, "tp", TP)
    return "tp"


def test_a_tp_run_logs_once_and_checkpoints_whole_files_that_generate_and_export_read(root, tp_run, tmp_path):
    assert_logged_and_checkpointed_once(root, tp_run, STEPS)
    assert_validates_as_one_device(root, tp_run, NO_BIAS, tmp_path)  # the group's processes share the windows
    last = last_checkpoint(root, tp_run)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state["model.lm_head.weight"].shape[0] == state["model.wte.weight"].shape[0] == 257  # bytes: whole
    assert_generate_and_export_read(last, tmp_path)


def test_a_killed_tp_run_resumes_exactly(root, tp_run):
    killed = kill_after_checkpoint(root, "tp-killed", step=3, overrides=TP)
    run(root, "tp-resumed", [*TP, f"ckpt_path={killed}"])
    assert_same_run(root, tp_run, ["tp-killed", "tp-resumed"])
