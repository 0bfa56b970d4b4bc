"""`llm-data prepare` throughput beside a plain `tokenizer.encode` loop, and loader vs training rate.

Measured in one run, on the same machine and input:
  1. peer: a single-process loop calling `tokenizer.encode(line)` over the file, then
     writing the ids as uint16 (what a one-off prepare script does);
  2. ours: `llm.data.prepare` (parallel workers, cached byte-level BPE, shards + index);
  3. the DataModule's batches/s over the written shards beside the `tiny` preset's
     training steps/s at the same batch shape (training must never wait for data).

Input: --input (e.g. nanoGPT's tinyshakespeare.txt) repeated to --mb megabytes. The tokenizer is a
byte-level BPE (vocab 4096) trained by `llm.data.bpe.train_bpe` on one copy.

    PYTHONPATH=shared:services .venv/bin/python benchmarks/data_prepare.py --input tinyshakespeare.txt --mb 50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peer(tok, path: Path, out: Path) -> float:
    t0 = time.perf_counter()
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids.extend(tok.encode(line))
    np.array(ids, dtype=np.uint16).tofile(out)
    return time.perf_counter() - t0


def _ours(tok, path: Path, out: Path, workers: int, fast_bpe: bool) -> float:
    from llm.data.prepare import PrepareConfig, prepare
    from llm.data.sources import SourceSpec

    cfg = PrepareConfig(
        source=SourceSpec(path=str(path)), out=str(out), workers=workers, fast_bpe=fast_bpe
    )
    t0 = time.perf_counter()
    prepare(cfg, tok, progress=False)
    return time.perf_counter() - t0


def _loader_and_training(out: Path, tok, seq_len: int, batch: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from llm.config import ModelConfig
    from llm.data.datamodule import DataConfig, TextDataModule
    from llm.models.decoder import DecoderModel

    dm = TextDataModule(
        DataConfig(dataset_path=str(out), seq_len=seq_len, global_batch_size=batch), tok
    )
    dm.next_batch()
    n, t0 = 2000, time.perf_counter()
    for _ in range(n):
        dm.next_batch()
    loader = n / (time.perf_counter() - t0)

    torch.manual_seed(0)
    model = DecoderModel(
        ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=seq_len)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        b = dm.next_batch()
        logits = model(b.input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    steps, t0 = 20, time.perf_counter()
    for _ in range(steps):
        step()
    return loader, steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, required=True, help="text, e.g. tinyshakespeare.txt")
    ap.add_argument("--mb", type=float, default=50.0, help="size to repeat the input to")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--breakdown", action="store_true", help="also time ours without the fast BPE")
    args = ap.parse_args()
    if not args.input.is_file():
        sys.exit(f"data_prepare.py: --input {args.input}: not found")
    logging.basicConfig(level=logging.WARNING)
    from llm.data.bpe import train_bpe

    text = args.input.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        big = tmpd / "input.txt"
        big.write_text(text * max(1, round(args.mb * 1e6 / len(text.encode()))), encoding="utf-8")
        mb = big.stat().st_size / 1e6
        tok = train_bpe([text], tmpd / "tok", vocab_size=args.vocab_size)
        print(
            f"input {mb:.1f} MB, byte-level BPE vocab {tok.vocab_size}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
        )

        t_peer = _peer(tok, big, tmpd / "peer.bin")
        t_ours = _ours(tok, big, tmpd / "ours", args.workers, fast_bpe=True)
        peer_ids = np.fromfile(tmpd / "peer.bin", dtype=np.uint16)
        from llm.data.shards import TokenShards

        shards = TokenShards(str(tmpd / "ours"))
        ours_ids = np.asarray(shards.read(0, shards.n_tokens))[:-1]  # less the final EOS
        rows = [
            ("peer: tokenizer.encode loop, 1 process", t_peer),
            (f"ours: llm-data prepare, {args.workers} workers", t_ours),
        ]
        if args.breakdown:
            t_hf = _ours(tok, big, tmpd / "ours-hf", args.workers, fast_bpe=False)
            rows.append((f"ours without fast BPE (HF Rust backend), {args.workers} workers", t_hf))
        for name, t in rows:
            print(f"  {name:<62} {mb / t:7.2f} MB/s  ({t:6.1f} s)  x{t_peer / t:.2f}")
        print(
            f"  same token ids as the peer: {np.array_equal(peer_ids, ours_ids)} ({len(ours_ids)} tokens)"
        )

        loader, train = _loader_and_training(tmpd / "ours", tok, seq_len=256, batch=16)
        print(
            f"loader: {loader:9.1f} batches/s (16x256)   tiny preset training: {train:6.2f} steps/s"
            f"   loader/training x{loader / train:.0f}"
        )
        print(
            json.dumps(
                {
                    "event": "benchmark",
                    "mb": round(mb, 2),
                    "peer_mb_s": round(mb / t_peer, 3),
                    "ours_mb_s": round(mb / t_ours, 3),
                    "ratio": round(t_peer / t_ours, 2),
                    "loader_batches_s": round(loader, 1),
                    "train_steps_s": round(train, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
