"""``scripts/export.py`` writes a ``GPT2LMHeadModel`` that computes losslab's logits, and a tokenizer
that transformers and tiktoken load, tokenizing as the one the model was trained with."""

import subprocess
import sys
from functools import partial
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import tiktoken
import torch
from helpers import REPO, tokenizer_named

from losslab.checkpoint_files import CheckpointError
from losslab.lightning_module import GPTLightningModule
from losslab.losses import build_loss
from losslab.model import GPT, GPTConfig
from losslab.tokenizers import build_tokenizer, load_exported_tokenizer, tokenizer_to_data

transformers = pytest.importorskip("transformers", reason="exporting needs transformers: pip install -e '.[export]'")
from losslab.export import ExportError, export_checkpoint  # noqa: E402  (needs transformers)

# text the bpe tokenizer of test_checkpoint_files never saw, and text that is hard to split
TEXTS = [
    *(topics[name] for name in ("if", "while", "with", "try")),
    "naïve café, 日本語 🤖 \x00\x7f\U0010ffff",
    "  leading, trailing and inner   spaces  \n\n\t\n",
    "don't we'll they're I've 1234567 x=1;y+=2",
    *(char * n for char in " a1=\n" for n in (1, 2, 3, 7, 16, 33)),
]


def write_checkpoint(path: Path, config: GPTConfig, tokenizer: tiktoken.Encoding) -> GPT:
    """A checkpoint with the keys train.py writes, of a GPT whose every weight, bias and LayerNorm
    parameter is random (so that a wrongly mapped one shows); returns that GPT."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.2)
    module = GPTLightningModule(
        model,
        loss=partial(build_loss, "cross_entropy"),
        optimizer=torch.optim.SGD,
        tokenizer=tokenizer_to_data(tokenizer),
    )
    checkpoint = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return model


def small_config(vocab_size: int, **options) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, context_length=16, n_layer=2, n_head=2, n_embd=32, **options)


@pytest.mark.parametrize("bias", [True, False])
def test_the_exported_model_computes_losslab_s_logits(tmp_path, bias):
    tokenizer = build_tokenizer("bytes")
    model = write_checkpoint(tmp_path / "last.ckpt", small_config(tokenizer.n_vocab, bias=bias), tokenizer)
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "out")

    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert exported.config.activation_function == "gelu"  # the exact GELU of losslab's MLP
    ids = torch.randint(tokenizer.n_vocab, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = model(ids)
        logits = exported(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_an_lm_head_bias_is_refused_naming_the_option(tmp_path):
    tokenizer = build_tokenizer("bytes")
    write_checkpoint(tmp_path / "last.ckpt", small_config(tokenizer.n_vocab, lm_head_bias=True), tokenizer)
    with pytest.raises(ExportError, match="model.lm_head_bias=true, and GPT2LMHeadModel's LM head has no bias"):
        export_checkpoint(tmp_path / "last.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["bytes", "bpe", "gpt2"])
def test_the_exported_tokenizer_tokenizes_as_tiktoken(tmp_path, request, name):
    tokenizer = tokenizer_named(name, request)
    write_checkpoint(tmp_path / "last.ckpt", small_config(tokenizer.n_vocab), tokenizer)
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "out")

    for hf_class in (transformers.AutoTokenizer, transformers.GPT2TokenizerFast):
        hf = hf_class.from_pretrained(tmp_path / "out")
        assert hf.eos_token_id == hf.bos_token_id == tokenizer.eot_token
        for text in TEXTS:
            ids = hf(text)["input_ids"]
            assert ids == tokenizer.encode_ordinary(text), (hf_class.__name__, text)
            assert hf.decode(ids) == text
        # as in GPT-2's own: <|endoftext|> in the text is the special token
        assert hf("a<|endoftext|>b")["input_ids"] == tokenizer.encode("a<|endoftext|>b", allowed_special="all")
    assert tokenizer_to_data(load_exported_tokenizer(tmp_path / "out")) == tokenizer_to_data(tokenizer)


def test_export_py_writes_the_model_and_refuses_in_one_line(tmp_path):
    tokenizer = build_tokenizer("bytes")
    write_checkpoint(tmp_path / "last.ckpt", small_config(tokenizer.n_vocab), tokenizer)
    run = export_py(tmp_path / "last.ckpt", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}

    write_checkpoint(tmp_path / "biased.ckpt", small_config(tokenizer.n_vocab, lm_head_bias=True), tokenizer)
    run = export_py(tmp_path / "biased.ckpt", tmp_path / "biased")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {tmp_path / 'biased.ckpt'} was trained with model.lm_head_bias=true")
    )


def test_export_never_writes_over_a_file_other_files_or_an_export_unasked(tmp_path):
    tokenizer = build_tokenizer("bytes")
    write_checkpoint(tmp_path / "last.ckpt", small_config(tokenizer.n_vocab), tokenizer)
    (tmp_path / "a file").write_text("keep me")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    refusals = {
        "a file": r"is a file, not a folder: give the folder to export to \(it is created\)",
        "notes": r"already holds other files \(todo.txt\): give a new or empty folder to export to",
    }
    for name, message in refusals.items():
        for overwrite in (False, True):
            with pytest.raises(ExportError, match=f"^{tmp_path / name} {message}$"):
                export_checkpoint(tmp_path / "last.ckpt", tmp_path / name, overwrite=overwrite)
    assert (tmp_path / "a file").read_text() == (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

    (tmp_path / "empty").mkdir()
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "empty")  # an empty folder is a new one
    exported = (tmp_path / "empty" / "model.safetensors").read_bytes()
    message = "already holds an export: give another folder, or --overwrite to replace it"
    with pytest.raises(ExportError, match=message):
        export_checkpoint(tmp_path / "last.ckpt", tmp_path / "empty")
    write_checkpoint(tmp_path / "other.ckpt", small_config(tokenizer.n_vocab, bias=False), tokenizer)
    export_checkpoint(tmp_path / "other.ckpt", tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / "model.safetensors").read_bytes() != exported


def test_a_damaged_or_diverged_checkpoint_is_never_exported(tmp_path):
    tokenizer = build_tokenizer("bytes")
    model = write_checkpoint(tmp_path / "last.ckpt", small_config(tokenizer.n_vocab), tokenizer)
    data = bytearray((tmp_path / "last.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.ckpt").write_bytes(data)
    with pytest.raises(CheckpointError, match="flipped.ckpt is truncated or damaged .*does not match its CRC-32"):
        export_checkpoint(tmp_path / "flipped.ckpt", tmp_path / "out")
    with torch.no_grad():
        model.ln_f.weight[3] = float("nan")
    module = GPTLightningModule(
        model, partial(build_loss, "cross_entropy"), torch.optim.SGD, tokenizer=tokenizer_to_data(tokenizer)
    )
    checkpoint = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"nan.ckpt holds non-finite weights \(ln_f.weight: 1 of 32 values"):
        export_checkpoint(tmp_path / "nan.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def export_py(checkpoint: Path, out_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "export.py"), str(checkpoint), str(out_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)
