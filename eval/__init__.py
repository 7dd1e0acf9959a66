"""Measuring edits: the paper's CLIP metrics, PIE-Bench's background and structure metrics, benchmark runs
(``fpedit eval``) and attention-map pictures (``fpedit maps``).

Every model a metric needs comes from a local folder the user names; nothing is downloaded. Submodules import
torch, transformers and torchmetrics only when used, so ``fpedit --help`` stays fast.
"""
