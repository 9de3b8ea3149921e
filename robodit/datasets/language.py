"""Instructions for language-goal policies: templated paraphrases and the store's cached embeddings.

Paraphrases: `paraphrases(instruction, "train")` are what collection writes into stores; the "heldout"
templates never appear in training data, so evaluating with them measures how far the policy follows the
language encoder's sense of a sentence rather than a memorised string.

Embeddings: `embed_store` computes every instruction of a store once with a frozen encoder and caches them in
``meta/lang_emb`` with the encoder's name; `store_language_table` hands them to the sampler and refuses a
table written by another encoder (its vectors would be meaningless to a policy trained on the other).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_TEMPLATES = {
    "train": ("{}", "please {}", "{} now", "robot, {}", "your task is to {}"),
    "heldout": ("could you {}?", "go ahead and {}", "i would like you to {}"),
}


def paraphrases(instruction: str, split: str = "train") -> list[str]:
    """Templated rephrasings of one instruction; `split` "train" (5) or "heldout" (3, disjoint from train)."""
    if split not in _TEMPLATES:
        raise ValueError(f"unknown paraphrase split {split!r}; choose 'train' or 'heldout'")
    return [t.format(instruction) for t in _TEMPLATES[split]]


def embed_store(path: str | Path, encoder: str = "minilm") -> dict:
    """Embed the store's instructions that are not cached yet (all of them if the cached table came from
    another encoder) and write ``meta/lang_emb``. Returns {"encoder", "instructions", "embedded"}."""
    from robodit.datasets.store import DemoStore
    from robodit.nn.language import get_language_encoder

    with DemoStore.open(path, "a") as store:
        texts = store.instructions()
        cached = store.language_embeddings()
        table = dict(cached[1]) if cached is not None and cached[0] == encoder else {}
        todo = [t for t in texts if t not in table]
        if todo:
            table.update(zip(todo, get_language_encoder(encoder).encode(todo)))
        if todo or cached is None or cached[0] != encoder:
            store.set_language_embeddings(encoder, {t: table[t] for t in texts})
    return {"encoder": encoder, "instructions": len(texts), "embedded": len(todo)}


def store_language_table(store, encoder: str) -> dict[str, np.ndarray]:
    """{instruction: [D]} for every instruction of `store`, checked against `encoder`; clear errors otherwise."""
    texts = store.instructions()
    cached = store.language_embeddings()
    hint = f"run `robodit embed {store.path} --encoder {encoder}`"
    if cached is None:
        if not texts:
            return {}
        raise ValueError(f"store {store.path} has {len(texts)} instruction(s) but no language embeddings "
                         f"(meta/lang_emb): {hint}")
    name, table = cached
    if name != encoder:
        raise ValueError(f"store {store.path}: meta/lang_emb was written by language encoder {name!r}, but the "
                         f"policy uses {encoder!r}: {hint} (or set policy.language_encoder={name})")
    missing = [t for t in texts if t not in table]
    if missing:
        raise ValueError(f"store {store.path}: {len(missing)} instruction(s) have no cached embedding "
                         f"(e.g. {missing[0]!r}): {hint}")
    return table


def embed_command(args) -> None:
    """CLI entry (`robodit embed STORE`)."""
    out = embed_store(args.store, encoder=args.encoder)
    print(f"{args.store}: {out['instructions']} instruction(s), {out['embedded']} newly embedded with "
          f"{out['encoder']!r} -> meta/lang_emb")
