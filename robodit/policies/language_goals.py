"""Instruction handling shared by language-conditioned policies (MDT, PAD): embed any sentence once, then reuse.

Training reads embeddings cached in the store (`goal.lang_emb`); at inference a user or the evaluator may pass
plain text (`goal={"instruction": ...}`), which is embedded here with the encoder the policy was trained with.
A sentence never seen in training is simply encoded: nothing is looked up in a fixed table.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class LanguageGoals:
    """Mixin: needs `self.language_encoder` (name) and `self.lang_dim`."""

    language_encoder: str | None = None
    lang_dim: int = 0

    def embed_instructions(self, texts: list[str]) -> np.ndarray:
        """[N, lang_dim] embeddings of any instructions, each encoded once per process and cached on the policy."""
        cache = self.__dict__.setdefault("_lang_cache", {})
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if todo:
            from robodit.nn.language import get_language_encoder

            if not self.language_encoder:
                raise ValueError(f"{type(self).__name__} was trained without a language encoder: give goal ids, not "
                                 "instructions")
            encoder = get_language_encoder(self.language_encoder)
            if encoder.dim != self.lang_dim:
                raise ValueError(f"language encoder {self.language_encoder!r} gives {encoder.dim}-d embeddings; this "
                                 f"policy was built for {self.lang_dim}")
            cache.update(zip(todo, encoder.encode(todo)))
        return np.stack([cache[t] for t in texts])

    def embed_goal_instruction(self, goal: dict[str, Any] | None) -> dict[str, Any]:
        """goal with "instruction" (str or list of str) replaced by "lang_emb" [N, lang_dim]."""
        goal = dict(goal or {})
        if "instruction" in goal:
            texts = goal.pop("instruction")
            texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
            goal["lang_emb"] = self.embed_instructions(texts)
        return goal
