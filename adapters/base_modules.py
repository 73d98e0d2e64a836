"""BaseModules: the served base model as adapter validation sees it.

A read-only mapping of every module an adapter may target, full module name -> (in, out): a decoder projection
or the output projection as a linear layer (in_features, out_features), the token embedding as the linear
layer PEFT's LoRA treats it as (vocabulary size, embedding dim: lora_embedding_A is [r, vocab], B [dim, r]).
Beside the shapes it knows which module is the embedding and which the output projection (and whether the
two share their weight, `tie_word_embeddings`), and it reads a module's base weight for DoRA's norm
(adapters/dora.py): dequantized from bitsandbytes nf4 / int8 as PEFT's `dequantize_module_weight` does, as the
linear view [out, in] (an embedding's E^T [dim, vocab]). A plain {name: (in, out)} mapping given to the loader
instead knows no embeddings and no weights (tests, tools): DoRA adapters are then refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

WeightReader = Callable[[str], torch.Tensor]  # module name -> base weight [out, in] (linear view)


class BaseModules(Mapping[str, tuple[int, int]]):
    def __init__(self, shapes: Mapping[str, tuple[int, int]], *, embedding: str | None = None,
                 head: str | None = None, tied: bool = False, weights: WeightReader | None = None) -> None:
        self._shapes = dict(shapes)
        self.embedding = embedding  # the token embedding's module name (None: not targetable)
        self.head = head  # the output projection's (lm_head)
        self.tied = tied  # lm_head's weight is the embedding's (tie_word_embeddings)
        self._weights = weights

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, int]]) -> BaseModules:
        """`shapes` as BaseModules (itself when it is one already)."""
        return shapes if isinstance(shapes, BaseModules) else cls(shapes)

    def __getitem__(self, name: str) -> tuple[int, int]:
        return self._shapes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def is_embedding(self, name: str) -> bool:
        return name == self.embedding

    def is_output_layer(self, name: str) -> bool:
        """The embedding or the output projection: the layers PEFT's "all-linear" leaves out and whose base weights
        PEFT may save beside the adapter (`save_embedding_layers`)."""
        return name in (self.embedding, self.head)

    @property
    def has_weights(self) -> bool:
        return self._weights is not None

    def weight(self, name: str) -> torch.Tensor:
        """The base weight of `name` as the linear view [out, in], on the base model's device (for DoRA's norm)."""
        if self._weights is None:
            raise LookupError("this validation has no access to the base model's weights")
        return self._weights(name)
