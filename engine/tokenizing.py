"""The process's tokenizer lock, in a module of its own so that every user (text encodes, blend-word
lookups) can import it without importing the executor.

A Hugging Face fast tokenizer keeps its padding and truncation settings on the shared Rust object and sets them
on every call, so two threads tokenizing at once can get each other's settings (an unpadded 9-id prompt where
77 were asked for, or a word lookup that misses the word). Tokenizing takes microseconds: one lock for the
whole process also covers engines that share a tokenizer.
"""

from __future__ import annotations

import threading

TOKENIZER_LOCK = threading.Lock()
