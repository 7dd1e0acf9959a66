"""Derive the SD 1.x CLIP tokenizer files (vocab.json, merges.txt) shipped in ``configs/sd1/tokenizer``.

Run once by maintainers, never at load time: ``python derive_tokenizer.py bpe_simple_vocab_16e6.txt.gz OUT``.
The BPE file is OpenAI CLIP's (MIT), also shipped by ``open_clip_torch`` (MIT; ``pip download --no-deps
open_clip_torch`` and unzip ``open_clip/bpe_simple_vocab_16e6.txt.gz``). CLIP's tokenizer keeps the file's
first 49152 - 256 - 2 merges and numbers its vocabulary as: the 256 byte symbols, the same with ``</w>``, one
token per merge (the pair joined), then ``<|startoftext|>`` and ``<|endoftext|>`` (49408 ids).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

VOCAB_SIZE = 49408


def byte_symbols_in_clip_order() -> list[str]:
    """CLIP's byte-to-symbol table in its own order: printable bytes first, then the others as chr(256+n)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def derive(bpe_gz: Path, out: Path) -> None:
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = byte_symbols_in_clip_order()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    derive(Path(sys.argv[1]), Path(sys.argv[2]))
