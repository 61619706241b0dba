"""Export a losslab checkpoint as a Hugging Face ``GPT2LMHeadModel``, with its tokenizer.

    python scripts/export.py logs/runs/<run>/checkpoints/last.ckpt exported/

writes to ``exported/`` (a new or empty folder; ``--overwrite`` replaces an earlier export in it):

- ``config.json`` and ``model.safetensors``: ``GPT2LMHeadModel.from_pretrained("exported")``;
- ``tokenizer.json`` and ``tokenizer_config.json``: ``AutoTokenizer.from_pretrained("exported")``,
  which tokenizes as the tiktoken tokenizer the model was trained with (GPT-2's, a trained BPE or
  the bytes: all are byte-level BPEs);
- ``tiktoken/``: that tokenizer itself, ``losslab.tokenizers.load_exported_tokenizer("exported")``.

losslab's GPT is GPT-2's architecture, with two differences the export maps exactly: its MLP uses
the exact (erf) GELU, which is transformers' ``"gelu"`` (GPT-2's own ``"gelu_new"`` is the tanh
approximation), and ``model.bias=false`` drops the biases of Linear and LayerNorm layers, which
exports as zero biases. ``model.lm_head_bias=true`` has no counterpart (GPT-2's LM head has no
bias) and is refused. Needs the ``export`` extra: ``pip install -e ".[export]"``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tiktoken
import torch
from torch import Tensor, nn

from losslab.checkpoint_files import CheckpointError, load_model
from losslab.model import GPT
from losslab.tokenizers import export_tokenizer

try:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        f"exporting needs transformers and its tokenizers ({error}): pip install -e '.[export]'"
    ) from None


class ExportError(ValueError):
    """A model that ``GPT2LMHeadModel`` cannot hold, or a folder that must not be written to."""


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> None:
    """Write the model and tokenizer of a losslab checkpoint to ``out_dir`` (see the module's doc).

    ``out_dir`` is a new or empty folder; with ``overwrite``, a folder holding an earlier export,
    whose files are replaced. Anything else is refused (ExportError) before the checkpoint is read.
    """
    check_out_dir(Path(out_dir), overwrite)
    model, tokenizer = load_model(checkpoint)
    if model.config.lm_head_bias:
        raise ExportError(
            f"{checkpoint} was trained with model.lm_head_bias=true, and GPT2LMHeadModel's LM head has no "
            "bias: only models trained with model.lm_head_bias=false export"
        )
    gpt2_model(model, tokenizer.eot_token).save_pretrained(out_dir)
    hf_tokenizer(tokenizer, model.config.context_length).save_pretrained(out_dir)
    export_tokenizer(tokenizer, out_dir)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Raise ExportError unless ``out_dir`` is absent, an empty folder, or (``overwrite``) a folder
    holding an export: never a file, never a folder of other files, never an export silently."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a folder: give the folder to export to (it is created)")
    held = sorted(path.name for path in out_dir.iterdir())
    if not held:
        return
    if not (out_dir / "config.json").is_file():
        raise ExportError(
            f"{out_dir} already holds other files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
            "give a new or empty folder to export to"
        )
    if not overwrite:
        raise ExportError(f"{out_dir} already holds an export: give another folder, or --overwrite to replace it")


def gpt2_model(model: GPT, eot_token: int) -> GPT2LMHeadModel:
    """``model`` as a ``GPT2LMHeadModel`` that computes the same logits."""
    c = model.config
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.context_length,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu",  # torch's F.gelu: the exact erf form
        layer_norm_epsilon=model.ln_f.eps,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=eot_token,
        eos_token_id=eot_token,
        tie_word_embeddings=True,
    )
    gpt2 = GPT2LMHeadModel(config)
    gpt2.load_state_dict(gpt2_weights(model))  # strict: every weight of the GPT-2 gets its value
    return gpt2.eval()


def gpt2_weights(model: GPT) -> dict[str, Tensor]:
    """``model``'s weights under ``GPT2LMHeadModel``'s names."""
    weights = {
        "transformer.wte.weight": model.wte.weight,
        "transformer.wpe.weight": model.wpe.weight,
        "lm_head.weight": model.lm_head.weight,  # the same tensor as wte: tied, in both models
        **layer_norm("transformer.ln_f", model.ln_f),
    }
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}"
        weights |= layer_norm(f"{h}.ln_1", block.ln_1) | layer_norm(f"{h}.ln_2", block.ln_2)
        weights |= conv1d(f"{h}.attn.c_attn", block.attn.qkv) | conv1d(f"{h}.attn.c_proj", block.attn.proj)
        weights |= conv1d(f"{h}.mlp.c_fc", block.mlp.fc) | conv1d(f"{h}.mlp.c_proj", block.mlp.proj)
    return weights


def conv1d(name: str, linear: nn.Linear) -> dict[str, Tensor]:
    """A Linear layer as GPT-2's ``Conv1D``, which computes ``x @ weight + bias``: the weight
    transposed, and a zero bias where the layer has none."""
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    return {f"{name}.weight": linear.weight.T, f"{name}.bias": bias}


def layer_norm(name: str, norm: nn.LayerNorm) -> dict[str, Tensor]:
    """A LayerNorm's weight and bias, a zero bias where it has none."""
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)
    return {f"{name}.weight": norm.weight, f"{name}.bias": bias}


def hf_tokenizer(enc: tiktoken.Encoding, context_length: int) -> PreTrainedTokenizerFast:
    """``enc`` as a Hugging Face byte-level BPE that gives the same tokens.

    tiktoken merges, again and again, the neighbouring pair that forms the token of lowest rank, and
    takes a piece that is a token whole. A BPE does the same given each split of a token into two
    tokens as a merge ranked by the token's rank, and ``ignore_merges``: the recipe of transformers'
    ``TikTokenConverter``, not called itself since it reads the ranks through tiktoken's file cache,
    keyed by path (a second export to the same folder would get the first one's ranks).
    """
    ranks = enc._mergeable_ranks  # private in tiktoken, used as its README does
    char = bytes_to_unicode()  # byte-level BPE's printable character for each byte

    def text(token: bytes) -> str:
        return "".join(char[byte] for byte in token)

    # by the token's rank, then (as transformers) by the ranks of the two parts
    splits = sorted(
        (rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    merges = [(text(left), text(right)) for *_, left, right in splits]
    vocab = {text(token): rank for token, rank in ranks.items()} | enc._special_tokens
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # in the vocabulary with their ids; this makes them special: never split, found in the text
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in enc._special_tokens])
    eot = enc.decode([enc.eot_token])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eot, eos_token=eot, model_max_length=context_length
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file written by train.py")
    parser.add_argument("out_dir", help="the folder to write the model and tokenizer to: new or empty")
    parser.add_argument("--overwrite", action="store_true", help="replace the export that out_dir holds")
    args = parser.parse_args()
    try:
        export_checkpoint(args.checkpoint, args.out_dir, args.overwrite)
    except (CheckpointError, ExportError) as error:
        sys.exit(f"error: {error}")  # one line, not a traceback: the fix is in the message
    print(f"Exported to {args.out_dir}: load it with transformers.GPT2LMHeadModel.from_pretrained({args.out_dir!r})")


if __name__ == "__main__":
    main()
