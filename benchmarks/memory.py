"""Memory per worker at real scale, on CPU: peak RSS of each of 2 workers above an idle worker's, ÷ the model's bytes
in its training precision (targets: ZeRO-3 ≤ 0.75, ideal 0.5; ZeRO-0 ≤ 1.3); the set-up of a later trial of a
group ÷ the first's (target ≤ 5%); data memory ÷ the bytes of the tokens the trials read (target ≤ 2).

Builds, in a temporary folder, a Llama of about 270 M parameters from config (hidden 1024, 16 layers, vocabulary
32,000; saved in fp32 with save_pretrained) with a word-level tokenizer saved beside it (built offline), and a
.jsonl text file of --rows rows. Then, for ZeRO-0 and ZeRO-3 in fp32 and bf16, two worker processes (a gloo
process group of 2, one thread each: what a Ray Train group of 2 workers of 1 CPU runs, without Ray) run a group
of 2 trials (LoRA rank 8, α 16 and 64) of --steps steps of --batch × --seq-len tokens through
scaling_lab.trial.run_group. Each worker reports its peak RSS (VmHWM) after importing everything (Ray included, as
a Ray Train worker has it) and joining the process group (the idle baseline) and after the trials; rank 0's rows
give each trial's set-up and data times.
The data is measured alone, for a study that reads enough of it to weigh (--data-steps × --data-batch sequences,
by default 2,000 × 32): a first process prepares it (scans every row, tokenizes the rows read, stores them), then a
later one, as a later worker would, memory-maps it and reads every batch of 2 trials and their held-out rows,
through data.load_task and data.batch_iterator; its peak RSS above its baseline ÷ the bytes of the tokens read
(as stored: uint16 here) is the data ratio.

    nice -n 10 python benchmarks/memory.py [--rows 1000000 --seq-len 128 --steps 2 --batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB_SIZE = 32_000
SPECIALS = ["[UNK]", "<s>", "</s>"]
CONFIGURATIONS = [(0, "fp32"), (0, "bf16"), (3, "fp32"), (3, "bf16")]
TARGETS = {0: 1.3, 3: 0.75}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def resident_mb() -> dict[str, float]:
    """Resident now: anonymous memory, and pages of files (libraries' code, memory maps)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) / 1024 for name in ("RssAnon", "RssFile")}


def mapped_mb(folder: Path) -> float:
    """Resident pages of the files under `folder` that this process maps."""
    total_kb, counted = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[:1].isupper():  # a mapping's first line: its address range, ..., and its file
            counted = line.split()[-1].startswith(str(folder))
        elif counted and line.startswith("Rss:"):
            total_kb += int(line.split()[1])
    return total_kb / 1024


def build_model(directory: Path, hidden: int, layers: int) -> int:
    """A Llama from config with a word-level tokenizer beside it; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIALS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                                        eos_token="</s>")
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def write_text(path: Path, rows: int) -> None:
    """Rows of 20 to 60 words drawn from a Zipf-like distribution over the tokenizer's words."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(VOCAB_SIZE - len(SPECIALS))])
    with open(path, "w") as out:
        for start in range(0, rows, 10_000):
            count = min(10_000, rows - start)
            lengths = rng.integers(20, 61, size=count)
            drawn = np.minimum(rng.zipf(1.2, size=int(lengths.sum())) - 1, len(words) - 1)
            position = 0
            for length in lengths:
                out.write(json.dumps({"text": " ".join(words[drawn[position : position + length]])}) + "\n")
                position += length


def study_spec(model_dir: Path, data_file: Path, zero_stage: int, precision: str, args) -> dict:
    return {
        "name": f"memory-zero{zero_stage}-{precision}",
        "models": [{"name": "bench", "source": str(model_dir)}],
        "grid": {"ranks": [8], "alphas": [16, 64], "learning_rates": [1e-4], "seeds": [0]},
        "training": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len,
                     "eval_every": args.steps, "eval_batches": 1, "diagnostics_every": 0},
        "data": {"source": str(data_file), "text_column": "text"},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
        "execution": {"resources": {"workers": 2, "cpus_per_worker": 1}},
    }


def _join_group(rank: int, world_size: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def trial_worker(rank: int, port: int, group: dict, report: str) -> None:
    """One worker of the group: the same entry as a Ray Train worker's (train_worker_loop), without Ray."""
    _join_group(rank, 2, port)
    import deepspeed  # noqa: F401  (everything a trial imports, before the baseline is read)
    import peft  # noqa: F401
    import ray  # noqa: F401  (a Ray Train worker has it before its first trial; the trial's row asks it the node)
    import transformers  # noqa: F401

    from scaling_lab import train, trial  # noqa: F401

    baseline = peak_rss_mb()
    trial.train_worker_loop(group)
    Path(report, f"worker{rank}.json").write_text(json.dumps({"baseline_mb": baseline, "peak_mb": peak_rss_mb()}))


def data_worker(rank: int, port: int, spec_dict: dict, report: str, phase: str) -> None:
    """The data alone, as a worker of the study reads it: the task (prepared by the first worker to need it,
    memory-mapped by the others), then every batch of the group's 2 trials and their held-out rows."""
    _join_group(rank, 1, port)
    import torch

    from scaling_lab import data, models, spec as spec_lib
    from scaling_lab.grid import expand

    config = expand(spec_lib.parse(spec_dict))[0]
    tokenizer = models._tokenizer(config.model.source, {})
    # A training worker has run torch's tensor code (loading its model) before it reads a batch; so does this one,
    # so that the first run of that code, shared by every process on the node, is not counted as data.
    int(torch.randperm(8, generator=torch.Generator().manual_seed(0)).sum())
    resident, baseline = resident_mb(), peak_rss_mb()
    started = time.perf_counter()
    task = data.load_task(config.data, config.training, kind="causal_lm", tokenizer=tokenizer,
                          vocab_size=VOCAB_SIZE, base_dir=ROOT, cache_dir=Path(report) / "cache")
    load_s = time.perf_counter() - started
    opened_mb = peak_rss_mb()
    itemsize = task.train.table.column("input_ids").type.value_type.bit_width // 8  # as stored: uint16 or int32
    tokens = 0
    for trial in range(2):  # every trial of the study reads the same rows: the first trial's are counted
        batches = data.batch_iterator(task.train, config.training.batch_size, seed=config.seed)
        held_out = torch.arange(min(len(task.eval), config.training.eval_batches * config.training.batch_size))
        for batch in [task.eval.batch(held_out)] + [None] * config.training.total_steps:
            batch = batch if batch is not None else next(batches)  # one batch at a time, as a trial reads them
            tokens += int(batch["attention_mask"].sum()) if trial == 0 else 0
    peak_mb = peak_rss_mb()
    grown = {name: mb - resident[name] for name, mb in resident_mb().items()}  # read after the peak: not in it
    Path(report, f"data-{phase}.json").write_text(json.dumps({
        "baseline_mb": baseline, "opened_mb": opened_mb, "peak_mb": peak_mb, "load_s": load_s, "tokens": tokens,
        "token_bytes": tokens * itemsize, "prepared_files_mb": mapped_mb(Path(report) / "cache"),
        "files_grown_mb": grown["RssFile"], "anonymous_grown_mb": grown["RssAnon"],
    }))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stages", default="0,3", help="ZeRO stages to measure, e.g. 3")
    parser.add_argument("--data-steps", type=int, default=2000, help="steps of the study whose data is measured")
    parser.add_argument("--data-batch", type=int, default=32, help="its batch size")
    args = parser.parse_args()
    stages = {int(stage) for stage in args.stages.split(",") if stage}

    import pandas as pd
    import torch.multiprocessing as mp

    from scaling_lab import results, spec as spec_lib
    from scaling_lab.grid import expand
    from scaling_lab.group import GroupSpec

    with tempfile.TemporaryDirectory(prefix="memory-benchmark-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        num_params = build_model(workdir / "model", args.hidden, args.layers)
        write_text(workdir / "text.jsonl", args.rows)
        print(f"model: Llama of {num_params / 1e6:.0f} M parameters (fp32 {num_params * 4 / 2**20:,.0f} MB), "
              f"text: {args.rows:,} rows; built in {time.perf_counter() - started:.0f} s", flush=True)
        print(f"each configuration: 2 workers × 1 thread run 2 trials of {args.steps} steps × {args.batch} × "
              f"{args.seq_len} tokens", flush=True)

        summary = []
        for zero_stage, precision in [(stage, precision) for stage, precision in CONFIGURATIONS if stage in stages]:
            spec_dict = study_spec(workdir / "model", workdir / "text.jsonl", zero_stage, precision, args)
            trials = expand(spec_lib.parse(spec_dict))
            name = spec_dict["name"]
            group = GroupSpec(trials=tuple(t.to_dict() for t in trials), results_dir=str(workdir / name),
                              cache_dir=str(workdir / "cache"), base_dir=str(ROOT), backend="ray_train",
                              study=name).to_dict()
            report = workdir / f"{name}-report"
            report.mkdir()
            mp.spawn(trial_worker, args=(free_port(), group, str(report)), nprocs=2)
            rows = results.load(workdir / name).set_index("trial_id").loc[[t.trial_id for t in trials]]
            if not (rows["status"] == "ok").all():
                raise SystemExit(f"{name}: a trial ended {rows['status'].tolist()}: {rows['error'].dropna().tolist()}")
            model_mb = num_params * (4 if precision == "fp32" else 2) / 2**20
            workers = [json.loads((report / f"worker{rank}.json").read_text()) for rank in (0, 1)]
            above = [w["peak_mb"] - w["baseline_mb"] for w in workers]
            setup, data_time = rows["setup_time_s"].tolist(), rows["data_time_s"].tolist()
            print(f"ZeRO-{zero_stage} {precision}: idle worker {workers[0]['baseline_mb']:,.0f} MB; peak above it "
                  f"{above[0]:,.0f} / {above[1]:,.0f} MB per worker = {above[0] / model_mb:.2f} / "
                  f"{above[1] / model_mb:.2f} × the model's {model_mb:,.0f} MB; set-up (model + data) first "
                  f"{setup[0]:.1f} s, "
                  f"later {setup[1]:.2f} s; data first {data_time[0]:.2f} s, later {data_time[1]:.4f} s", flush=True)
            summary.append({"configuration": f"ZeRO-{zero_stage} {precision}",
                            "memory ratio": max(above) / model_mb, "target": TARGETS[zero_stage],
                            "later set-up ratio": setup[1] / setup[0]})

        report = workdir / "data-report"
        report.mkdir()
        data_args = argparse.Namespace(steps=args.data_steps, batch=args.data_batch, seq_len=args.seq_len)
        data_spec = study_spec(workdir / "model", workdir / "text.jsonl", 0, "fp32", data_args)
        for phase in ("first", "later"):  # the first worker prepares the data; a later one memory-maps it
            mp.spawn(data_worker, args=(free_port(), data_spec, str(report), phase), nprocs=1)
        first, later = (json.loads((report / f"data-{phase}.json").read_text()) for phase in ("first", "later"))
        data_mb = later["peak_mb"] - later["baseline_mb"]
        opening_mb, reading_mb = later["opened_mb"] - later["baseline_mb"], later["peak_mb"] - later["opened_mb"]
        read_mb = later["token_bytes"] / 2**20
        print(f"data (a study of {args.data_steps} steps × {args.data_batch} sequences, 2 trials): the first worker "
              f"prepared {args.rows:,} rows in {first['load_s']:.1f} s, {first['peak_mb'] - first['baseline_mb']:,.0f}"
              f" MB above its idle baseline at the peak; a later worker opened them in {later['load_s']:.3f} s "
              f"({opening_mb:,.1f} MB: the prepared files' maps) and read {later['tokens']:,} "
              f"tokens ({read_mb:.2f} MB as stored) with {reading_mb:,.1f} MB more: {data_mb:,.1f} MB in all",
              flush=True)
        print(f"what it has resident above its baseline at the end: {later['prepared_files_mb']:.1f} MB of the "
              f"prepared files' pages, {later['files_grown_mb'] - later['prepared_files_mb']:.1f} MB of other files' "
              f"pages (libraries' code run for the first time), {later['anonymous_grown_mb']:.1f} MB anonymous",
              flush=True)

    print()
    if summary:
        print(pd.DataFrame(summary).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"data memory of a worker ÷ bytes of the tokens its trials read: {data_mb / read_mb:.2f} (target ≤ 2); "
          f"reading alone: {reading_mb / read_mb:.2f}")
    worst = {stage: max((s["memory ratio"] for s in summary if s["configuration"].startswith(f"ZeRO-{stage} ")),
                        default=float("nan")) for stage in (0, 3)}
    print(f"worst ratio, worker memory ÷ model bytes, ZeRO-3: {worst[3]:.3f} (target ≤ 0.75); ZeRO-0: "
          f"{worst[0]:.3f} (target ≤ 1.3); later set-up ÷ first: "
          f"{max((s['later set-up ratio'] for s in summary), default=float('nan')):.3f} (target ≤ 0.05)")


if __name__ == "__main__":
    main()
