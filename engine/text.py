"""Prompt embeddings: tokenize, encode on the backend, keep the recent ones (an LRU keyed by token ids)."""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from typing import Any

import torch

from .backends.base import Backend
from .executor import RequestRun
from .tokenizing import TOKENIZER_LOCK

log = logging.getLogger(__name__)

#: Prompt embeddings kept (LRU, keyed by token ids): a few MB at SD 1.5's 77 x 768 floats each.
TEXT_CACHE_SIZE = 256


class TextEncoderCache:
    """CLIP embeddings of prompts on one backend, the :data:`TEXT_CACHE_SIZE` most recent kept.

    A request embeds its prompts (and "") once per run; a server sees the same prompts again and again, and an
    encode costs a text-encoder call. Keys are token ids, so prompts that tokenize alike share an entry and a
    key is at most ``max_length`` ids whatever the prompt's length. Thread-safe.
    """

    def __init__(
        self, backend: Backend, tokenizer: Any, max_length: int, max_entries: int | None = None
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.max_entries = max(1, int(TEXT_CACHE_SIZE if max_entries is None else max_entries))
        self._entries: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def cached_keys(self) -> list[tuple[Any, ...]]:
        """The cached keys (token ids, then any adapter (name, scale) pairs), least recently used first."""
        with self._lock:
            return list(self._entries)

    def token_ids(self, prompt: str) -> torch.Tensor:
        """(1, max_length) ids of ``prompt``, padded and truncated; warns (without the prompt's text: server
        logs must not carry what users write) when the prompt had more tokens than fit."""
        with TOKENIZER_LOCK:
            full = self.tokenizer(prompt, truncation=False).input_ids
            ids = self.tokenizer(
                prompt, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).input_ids
        if len(full) > self.max_length:
            message = f"prompt has {len(full)} tokens; truncated to {self.max_length}"
            warnings.warn(message, stacklevel=4)
            log.warning(message)
        return ids

    def embed(self, prompt: str, run: RequestRun) -> torch.Tensor:
        """(1, L, D) embedding of ``prompt``; its time is counted in ``run``'s ``"text"`` stage."""
        with run.stage("text"):
            ids = self.token_ids(prompt)
            # A request's adapters change the text encoder's output: their set extends the key.
            key: tuple[Any, ...] = tuple(int(i) for i in ids[0]) + run.adapters
            with self._lock:
                cached = self._entries.get(key)
                if cached is not None:
                    self._entries.move_to_end(key)
                    return cached
            with self.backend.adapter_scope(run.adapters):
                embedding = self.backend.encode_text(ids)
        with self._lock:
            self._entries[key] = embedding
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return embedding
