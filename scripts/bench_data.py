"""Tokens per second and peak memory of building a text corpus's token files, against tiktoken alone.

Three arms, each in a fresh interpreter, alternating ``--rounds`` times, on the same documents
(``data=text``, GPT-2's tokenizer: set TIKTOKEN_CACHE_DIR offline):

- ``token files``: ``write_token_splits``, what ``GPTDataModule.setup`` runs on a new corpus:
  reading, cutting into documents, the split, tokenizing and writing, timed whole;
- ``encode_ordinary_batch``: tiktoken's batch call with a thread per core on the same documents,
  16 MiB of them at a time, only the calls timed;
- ``encode_to_numpy``: tiktoken's numpy call on the same batches, each cut into a part per core
  tokenized by a thread, only the calls timed: what tokenizing costs when nothing else is done.

    python scripts/make_corpus.py /tmp/corpus_1g.txt --mib 1024
    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python scripts/bench_data.py /tmp/corpus_1g.txt --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETUP = """
import json, os, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from losslab.data.corpora import open_corpus
from losslab.data.token_cache import available_cores, write_token_splits
from losslab.tokenizers import build_tokenizer
enc = build_tokenizer("gpt2")
corpus = open_corpus("text", sys.argv[1])
"""

ARMS = {
    "interpreter": "print(json.dumps({'seconds': 1, 'tokens': 0}))",
    "token files": """
with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    write_token_splits(corpus, enc, 0.1, Path(folder), {"train": "train", "val": "val"})
    seconds = time.perf_counter() - start
    files = [Path(folder) / f"{split}.bin" for split in ("train", "val")]
    n_documents = sum(len(__import__("numpy").load(file.with_suffix(".offsets.npy"))) - 1 for file in files)
    tokens = sum(file.stat().st_size // 2 for file in files) - n_documents  # uint16, less the <|endoftext|>s
print(json.dumps({"seconds": seconds, "tokens": tokens}))
""",
    "encode_ordinary_batch": """
def encode(batch):
    start = time.perf_counter()
    tokens = sum(map(len, enc.encode_ordinary_batch(batch, num_threads=available_cores())))
    return time.perf_counter() - start, tokens
""",
    "encode_to_numpy": """
threads = available_cores()
pool = ThreadPoolExecutor(threads)
def encode_part(documents):
    return sum(len(enc.encode_to_numpy(document, disallowed_special=())) for document in documents)
def encode(batch):
    start = time.perf_counter()
    tokens = sum(pool.map(encode_part, [batch[i::threads] for i in range(threads)]))
    return time.perf_counter() - start, tokens
""",
}
BATCHES = """
seconds = tokens = 0
batch, size = [], 0
for document in corpus.documents():
    batch.append(document)
    size += len(document)
    if size >= 1 << 24:
        took, n = encode(batch)
        seconds, tokens, batch, size = seconds + took, tokens + n, [], 0
took, n = encode(batch)
print(json.dumps({"seconds": seconds + took, "tokens": tokens + n}))
"""


def run(arm: str, corpus: str) -> dict:
    """Run ``arm`` in a fresh interpreter: its tokens, seconds and peak RSS in MiB."""
    code = SETUP + ARMS[arm] + (BATCHES if arm.startswith("encode") else "")
    process = subprocess.Popen([sys.executable, "-c", code, corpus], stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    if status != 0:
        sys.exit(f"{arm} failed")
    cpu = usage.ru_utime + usage.ru_stime
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "peak_mib": usage.ru_maxrss / 1024,
        "cpu_s": cpu,
    }  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a text file, e.g. from scripts/make_corpus.py")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base = run("interpreter", args.corpus)["peak_mib"]
    print(f"interpreter with losslab.data and GPT-2's tokenizer: peak RSS {base:.0f} MiB", flush=True)
    for round in range(1, args.rounds + 1):
        results = {arm: run(arm, args.corpus) for arm in ("token files", "encode_ordinary_batch", "encode_to_numpy")}
        rates = {arm: result["tokens"] / result["seconds"] for arm, result in results.items()}
        for arm, result in results.items():
            print(
                f"round {round}, {arm}: {result['tokens']:,} tokens in {result['seconds']:.1f} s, "
                f"{rates[arm]:,.0f} tokens/s (process CPU {result['cpu_s']:.0f} s), peak RSS {result['peak_mib'] - base:+.0f} MiB over the interpreter",
                flush=True,
            )
        print(
            f"round {round}: token files / encode_ordinary_batch = {rates['token files'] / rates['encode_ordinary_batch']:.2f}, "
            f"token files / encode_to_numpy = {rates['token files'] / rates['encode_to_numpy']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
