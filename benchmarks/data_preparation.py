"""Text data at scale: the memory and time of preparing a task once and of loading it again.

Writes a JSON-lines file of --rows rows of --words words drawn from a --vocab-word vocabulary, and a word-level
tokenizer of that vocabulary built offline (a PreTrainedTokenizerFast, as a real model's). Then, each in a fresh
process, so that nothing is shared but the cache directory:
- first load: the cache is empty; the process scans the file, tokenizes the rows the trials read and stores them;
- second load: another process (a later trial, another worker) finds them prepared and memory-maps them.
Each process then reads what one trial reads: its steps × batch train rows and its held-out batches.
Reported per load: seconds, the resident memory it added (peak and after reading; the libraries are imported
before the first measurement, except `datasets`, which only preparing imports) and the bytes of the token ids
the trial read. Prints the ratios last: second load ÷ first load (time), memory added ÷ token bytes read.

    python benchmarks/data_preparation.py [--rows 200000 --words 120 --seq-len 512 --batch-size 2 --steps 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_source(path: Path, rows: int, words: int, vocab_words: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "w") as out:
        for start in range(0, rows, 10_000):
            drawn = rng.integers(vocab_words, size=(min(10_000, rows - start), words))
            out.writelines(json.dumps({"text": " ".join(f"w{i}" for i in row)}) + "\n" for row in drawn)


def word_tokenizer(vocab_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def memory_kib() -> dict[str, int]:
    """Resident memory now and its peak (VmRSS, VmHWM), in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]), "peak": int(fields["VmHWM"].split()[0])}


def one_load(work: Path, args: argparse.Namespace) -> None:
    """In its own process: load the task as a trial does and read what the trial reads; print a JSON record."""
    import numpy as np
    import pyarrow as pa
    import torch

    from scaling_lab import data
    from scaling_lab.spec import DataSpec, TrainingSettings

    tokenizer = word_tokenizer(args.vocab_words)
    spec = DataSpec(source=str(work / "rows.jsonl"), text_column="text")
    training = TrainingSettings(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps)
    # The first torch and Arrow operations allocate (kernels, pools); a trial has run them before it loads data.
    warm_up = data.PreparedRows(pa.table({"input_ids": pa.array([[1, 2]], pa.list_(pa.uint16())),
                                          "loss_start": pa.array([0], pa.int32())}), pad_id=0)
    next(data.batch_iterator(warm_up, 2, seed=0))
    before = memory_kib()
    started = time.perf_counter()
    task = data.load_task(spec, training, kind="causal_lm", tokenizer=tokenizer, vocab_size=len(tokenizer),
                          base_dir=work, cache_dir=work / "cache")
    seconds = time.perf_counter() - started
    loaded = memory_kib()
    batches = data.batch_iterator(task.train, args.batch_size, seed=0)
    eval_batches = (torch.arange(start, min(start + args.batch_size, len(task.eval)))
                    for start in range(0, len(task.eval), args.batch_size))
    token_bytes = 0
    for batch in itertools.chain((next(batches) for _ in range(args.steps)), map(task.eval.batch, eval_batches)):
        token_bytes += int(batch["attention_mask"].sum()) * np.dtype(np.uint16).itemsize
    read = memory_kib()
    print(json.dumps({
        "seconds": seconds,
        "added_peak_mib": (read["peak"] - before["rss"]) / 1024,
        "added_after_load_mib": (loaded["rss"] - before["rss"]) / 1024,
        "added_after_reading_mib": (read["rss"] - before["rss"]) / 1024,
        "token_bytes_read": token_bytes,
        "token_type": str(task.train.table.schema.field("input_ids").type),
        "prepared_rows": [len(task.train), len(task.eval)],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--vocab-words", type=int, default=30_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, help="where the file and cache go (default: a temporary one)")
    parser.add_argument("--one-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_load:
        one_load(args.work_dir, args)
        return
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        source = work / f"rows-{args.rows}x{args.words}-{args.vocab_words}.jsonl"
        if not source.is_file():  # a --work-dir keeps it for the next run
            write_source(source, args.rows, args.words, args.vocab_words)
        (work / "rows.jsonl").unlink(missing_ok=True)
        (work / "rows.jsonl").symlink_to(source.name)
        shutil.rmtree(work / "cache", ignore_errors=True)
        print(f"source: {args.rows} rows x {args.words} words, {source.stat().st_size / 2**20:.0f} MiB")
        command = [sys.executable, __file__, "--one-load", "--work-dir", str(work)] + [
            f"--{name.replace('_', '-')}={getattr(args, name)}"
            for name in ("rows", "words", "vocab_words", "seq_len", "batch_size", "steps")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        loads = []
        for name in ("first load", "second load"):
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            loads.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: {json.dumps(loads[-1])}")
    first, second = loads
    print(f"second load / first load (time): {second['seconds'] / first['seconds']:.4f}")
    for name, load in zip(("first", "second"), loads):
        ratio = load["added_after_reading_mib"] * 2**20 / load["token_bytes_read"]
        print(f"{name} load: memory added after reading / token bytes read: {ratio:.1f}")


if __name__ == "__main__":
    main()
