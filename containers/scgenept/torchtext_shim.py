"""A pure-Python stand-in for the part of ``torchtext.vocab`` that scGPT uses.

``scgpt`` 0.2.4 imports ``torchtext`` for one thing: its ``GeneVocab`` subclasses
``torchtext.vocab.Vocab`` and builds vocabularies with ``torchtext.vocab.vocab``.
torchtext is retired and its compiled extension does not load with current torch
releases, so the image does not install it; :func:`install` registers this module as
``torchtext.vocab`` (and an empty ``torchtext`` package) in ``sys.modules`` before
``scgpt`` is imported.

Behaviour follows torchtext 0.18's ``Vocab`` and its C++ table: tokens keep insertion
order, ``insert_token`` shifts the tokens after the insertion point, looking up an
unknown token returns the default index or raises ``RuntimeError`` when none is set,
and inserting a token that exists or at an index out of ``[0, len]`` raises
``RuntimeError``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Mapping

from torch import nn

SHIM_VERSION = "0.18.0+czb.shim"


class VocabTable:
    """Token ↔ index table (what torchtext keeps in its C++ ``Vocab`` object)."""

    def __init__(self, tokens: Iterable[str], default_index: int | None = None) -> None:
        self.itos_: list[str] = []
        self.stoi_: dict[str, int] = {}
        self.default_index_ = default_index
        for token in tokens:
            self.append_token(token)

    def __len__(self) -> int:
        return len(self.itos_)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi_

    def __getitem__(self, token: str) -> int:
        index = self.stoi_.get(token)
        if index is not None:
            return index
        if self.default_index_ is None:
            msg = f"Token {token} not found and default index is not set"
            raise RuntimeError(msg)
        return self.default_index_

    def set_default_index(self, index: int | None) -> None:
        self.default_index_ = index

    def get_default_index(self) -> int | None:
        return self.default_index_

    def insert_token(self, token: str, index: int) -> None:
        if not 0 <= index <= len(self.itos_):
            msg = f"Specified index {index} is out of bounds for vocab of size {len(self.itos_)}"
            raise RuntimeError(msg)
        if token in self.stoi_:
            msg = f"Token {token} already exists in the Vocab with index: {self.stoi_[token]}"
            raise RuntimeError(msg)
        # Tokens after the insertion point move up by one, as in torchtext.
        for moved in self.itos_[index:]:
            self.stoi_[moved] += 1
        self.itos_.insert(index, token)
        self.stoi_[token] = index

    def append_token(self, token: str) -> None:
        if token in self.stoi_:
            msg = f"Token {token} already exists in the Vocab with index: {self.stoi_[token]}"
            raise RuntimeError(msg)
        self.stoi_[token] = len(self.itos_)
        self.itos_.append(token)

    def lookup_token(self, index: int) -> str:
        if not 0 <= index < len(self.itos_):
            msg = f"Specified index {index} is out of bounds for vocab of size {len(self.itos_)}"
            raise RuntimeError(msg)
        return self.itos_[index]

    def lookup_tokens(self, indices: Iterable[int]) -> list[str]:
        return [self.lookup_token(i) for i in indices]

    def lookup_indices(self, tokens: Iterable[str]) -> list[int]:
        return [self[t] for t in tokens]

    def get_stoi(self) -> dict[str, int]:
        return dict(self.stoi_)

    def get_itos(self) -> list[str]:
        return list(self.itos_)


class Vocab(nn.Module):
    """``torchtext.vocab.Vocab``: a module wrapping a :class:`VocabTable`."""

    def __init__(self, vocab: VocabTable) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens: list[str]) -> list[int]:
        return self.vocab.lookup_indices(tokens)

    def __len__(self) -> int:
        return len(self.vocab)

    def __contains__(self, token: str) -> bool:
        return token in self.vocab

    def __getitem__(self, token: str) -> int:
        return self.vocab[token]

    def set_default_index(self, index: int | None) -> None:
        self.vocab.set_default_index(index)

    def get_default_index(self) -> int | None:
        return self.vocab.get_default_index()

    def insert_token(self, token: str, index: int) -> None:
        self.vocab.insert_token(token, index)

    def append_token(self, token: str) -> None:
        self.vocab.append_token(token)

    def lookup_token(self, index: int) -> str:
        return self.vocab.lookup_token(index)

    def lookup_tokens(self, indices: list[int]) -> list[str]:
        return self.vocab.lookup_tokens(indices)

    def lookup_indices(self, tokens: list[str]) -> list[int]:
        return self.vocab.lookup_indices(tokens)

    def get_stoi(self) -> dict[str, int]:
        return self.vocab.get_stoi()

    def get_itos(self) -> list[str]:
        return self.vocab.get_itos()


def vocab(
    ordered_dict: Mapping[str, int],
    min_freq: int = 1,
    specials: list[str] | None = None,
    special_first: bool = True,
) -> Vocab:
    """``torchtext.vocab.vocab``: tokens in insertion order, kept when frequent enough."""
    specials = specials or []
    ordered = dict(ordered_dict)
    for token in specials:
        ordered.pop(token, None)
    tokens = [token for token, freq in ordered.items() if freq >= min_freq]
    tokens = specials + tokens if special_first else tokens + specials
    return Vocab(VocabTable(tokens))


def install() -> None:
    """Register this module as ``torchtext.vocab`` unless a torchtext is already imported."""
    if "torchtext.vocab" in sys.modules:
        return
    this = sys.modules[__name__]
    package = types.ModuleType("torchtext")
    package.__path__ = []  # a package, so ``import torchtext.vocab`` resolves
    package.__version__ = SHIM_VERSION
    package.vocab = this
    sys.modules["torchtext"] = package
    sys.modules["torchtext.vocab"] = this
