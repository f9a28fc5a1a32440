"""Training speed of the embedded default model: fp32 against bf16 autocast, alternated in one run.

    python benchmarks/train_speed.py OUT_DIR [--root DIR] [--profile NAME] [--rounds 5] [--steps 20]
                                             [--curve-steps N] [--threads 2]

* **Speed.** Each round trains a fresh copy of the `base` stage's model for ``--steps`` optimizer
  steps with the real trainer (:func:`sparsify.training.trainer.train`), once per variant, variants
  alternating within the round, so drift of this shared machine hits both alike. Reported: the
  median tokens/s over the rounds and each variant's ratio to fp32.
* **Same result.** With a corpus (the data stage's output under ``--root``, default the
  config's project root) and ``--curve-steps N``, each variant then trains N steps of the base
  stage's schedule from the same seed on the corpus' blocks, and the validation losses along the
  way are compared (bf16 autocast is worth having only if the loss curve matches fp32's).
  Without a corpus the speed rounds use random tokens and the curve is skipped.

Writes ``OUT_DIR/train_speed.json`` (with the CPU model and ISA). Run it alone: two torch jobs on
the same cores slow each other down.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsify.bench.cpu import machine_info  # noqa: E402
from sparsify.data.corpus import Corpus  # noqa: E402
from sparsify.model import bf16_supported, build_llama  # noqa: E402
from sparsify.training.trainer import train  # noqa: E402
from tasks.config import load_config  # noqa: E402

VARIANTS = {"fp32": False, "bf16": True}


def _blocks(root: Path, seq_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray | None, object | None]:
    """(train blocks, val blocks, tokenizer) from the corpus under ``root``, else random tokens."""
    corpus_dir = root / "data" / "corpus"
    if (corpus_dir / "meta.json").is_file():
        from sparsify.checkpoint import load_tokenizer

        corpus = Corpus.open(corpus_dir)
        return corpus.blocks("train"), corpus.blocks("val"), load_tokenizer(corpus.tokenizer_path)
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, size=(512, seq_len + 1), dtype=np.int64), None, None


class _RandomVocab:
    """What build_llama reads from a tokenizer, for the random-token case."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--config", default=str(REPO / "params.yaml"))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--root", type=Path, default=None, help="project root holding data/corpus (default: the config's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    ap.add_argument("--curve-steps", type=int, default=0, help="steps of the loss-curve comparison (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config, profile=args.profile)
    root = args.root or cfg.root
    tc = cfg.base.train
    train_blocks, val_blocks, tokenizer = _blocks(root, 256, 4096)
    tokenizer = tokenizer or _RandomVocab(int(train_blocks.max()) + 1)
    device = torch.device("cpu")
    result: dict = {
        "machine": machine_info(),
        "native_bf16": bf16_supported(device),
        "arch": cfg.base.arch.model_dump(),
        "batch_size": tc.batch_size,
        "seq_len": int(train_blocks.shape[1] - 1),
        "data": "corpus" if val_blocks is not None else "random tokens",
        "rounds": [],
    }

    def run(variant: str, steps: int, val: np.ndarray | None) -> tuple[float, object]:
        model = build_llama(cfg.base.arch, tokenizer, seed=cfg.project.seed)
        run_cfg = tc.model_copy(
            update={
                "steps": steps,
                "bf16": VARIANTS[variant],
                "checkpoint_every": 0,
                "warmup_steps": min(tc.warmup_steps, steps),
            }
        )
        t0 = time.perf_counter()
        res = train(model, train_blocks, val, run_cfg, seed=cfg.project.seed, device=device, progress=False)
        return time.perf_counter() - t0, res

    for _ in range(args.rounds):
        row = {}
        for variant in VARIANTS:
            _, res = run(variant, args.steps, None)
            row[variant] = res.tokens_per_s
        result["rounds"].append(row)
        print(" ".join(f"{v} {row[v]:,.0f} tok/s" for v in VARIANTS), flush=True)
    speed = {v: statistics.median(r[v] for r in result["rounds"]) for v in VARIANTS}
    result["tokens_per_s"] = speed
    result["speedup_vs_fp32"] = {v: speed[v] / speed["fp32"] for v in VARIANTS}

    if args.curve_steps and val_blocks is not None:
        curves = {}
        for variant in VARIANTS:
            seconds, res = run(variant, args.curve_steps, val_blocks)
            curves[variant] = {
                "seconds": seconds,
                "evals": res.evals,
                "final_train_loss": res.final_train_loss,
                "tokens_per_s": res.tokens_per_s,
            }
            print(
                variant,
                f"{args.curve_steps} steps in {seconds:.0f} s, val",
                [round(e["val_loss"], 4) for e in res.evals],
                flush=True,
            )
        fp32 = curves["fp32"]["evals"][-1]["val_loss"]
        for c in curves.values():
            c["final_val_loss_diff_vs_fp32"] = c["evals"][-1]["val_loss"] - fp32
        result["curve"] = {"steps": args.curve_steps, **curves}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps(result, indent=1, default=str))
    print(
        json.dumps(
            {"tokens_per_s": speed, "speedup_vs_fp32": result["speedup_vs_fp32"], "isa": result["machine"]["cpu_isa"]},
            indent=1,
        )
    )
    return result


if __name__ == "__main__":
    main()
