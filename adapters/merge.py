"""Per-request adapter merging (LoRAX's `merged_adapters`): 2..8 registered adapters with weights, one request.

Two ways to run a recipe, by strategy:

  linear   no merged copy. A merged token takes one device slot per adapter and the LoRA op runs extra passes
           over those tokens (ops/batch.py `split_passes`), each pass's delta scaled by the adapter's weight:
               y = base(x) + sum_i w_i * s_i * B_i (A_i x)
           which is exactly PEFT's `add_weighted_adapter(..., combination_type="cat")` (A_i * w_i * s_i stacked
           along the rank, B_i beside each other). Any ranks and target sets mix; the request holds a refcount
           on every adapter's slot while it runs, in the same batched forward as everyone else.
  ties, dare_linear, dare_ties
           not linear in the adapters, so they are computed once into a *virtual adapter*, as PEFT's
           `add_weighted_adapter(..., combination_type="ties_svd" / "dare_linear_svd" / "dare_ties_svd")` does:
           per module, the full deltas dW_i = s_i * B_i A_i are combined by peft.utils.merge_utils, then a
           truncated SVD takes the result back to rank r = max(ranks) (B = U S, A = V^T, scale 1). It lives
           under a reserved name (`MergeRecipe.virtual_name`, starting "merge:", which no registered adapter can
           take: ':' is not allowed in adapter names) and is loaded into one slot like any adapter: the host
           loader computes it off the engine thread (`load_virtual`), reading the components through the same
           reader as any load, and the SlotTable caches it in its host tier and in a slot.

DARE's random drop is seeded per (recipe.seed, module, adapter), so a recipe always gives the same adapter,
whatever thread computes it and in whatever order its modules come (PEFT draws from the global RNG instead).
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.weights import AdapterWeights, LoraModuleWeights

Strategy = Literal["linear", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]
STRATEGIES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS: tuple[str, ...] = ("total", "frequency")
MIN_ADAPTERS, MAX_ADAPTERS = 2, 8
VIRTUAL_PREFIX = "merge:"
# Virtual names the host loader can resolve; refreshed on every use, so only long-unused recipes drop out.
MAX_REMEMBERED = 4096


class RecipeError(ValueError):
    """An invalid merge recipe; `field` names the request field at fault (adapters, merge_strategy, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class MergeRecipe:
    """What a request merges: ((adapter name, weight), ...) in order, and how. Hashable: equal recipes give one
    virtual adapter. density, majority_sign_method: ties / dare strategies (as PEFT); seed: DARE's drop."""

    adapters: tuple[tuple[str, float], ...]
    strategy: Strategy = "linear"
    density: float = 1.0
    majority_sign_method: SignMethod = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        pairs = tuple((name, _weight(w, i)) for i, (name, w) in enumerate(_pairs(self.adapters)))
        object.__setattr__(self, "adapters", pairs)  # lists from JSON become tuples: the recipe stays hashable
        _check_names([name for name, _ in pairs])
        if not any(w != 0.0 for _, w in pairs):
            raise RecipeError("adapters", "every weight is 0: the merge would be the base model")
        if self.strategy not in STRATEGIES:
            raise RecipeError("merge_strategy", f"expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if isinstance(self.density, bool) or not isinstance(self.density, int | float) \
                or not 0.0 < float(self.density) <= 1.0:
            raise RecipeError("density", f"must be a number in (0, 1], got {self.density!r}")
        object.__setattr__(self, "density", float(self.density))
        if self.majority_sign_method not in SIGN_METHODS:
            raise RecipeError("majority_sign_method",
                              f"expected one of {', '.join(SIGN_METHODS)}, got {self.majority_sign_method!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError("seed", f"must be an integer, got {self.seed!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(w for _, w in self.adapters)

    @property
    def virtual(self) -> bool:
        """Computed into one virtual adapter (ties / dare); False: linear, run over the adapters' own slots."""
        return self.strategy != "linear"

    @functools.cached_property
    def label(self) -> str:
        """Exact and readable, for logs, metrics and fairness: "merge:a*0.7+b*0.3" (linear), else with the
        strategy and the parameters it reads: "merge:ties(density=0.5,total):a*0.7+b*0.3"."""
        terms = "+".join(f"{name}*{w!r}" for name, w in self.adapters)
        if not self.virtual:
            return f"{VIRTUAL_PREFIX}{terms}"
        params = [f"density={self.density!r}"]
        params += [self.majority_sign_method] if self.strategy.endswith("ties") else []
        params += [f"seed={self.seed}"] if self.strategy.startswith("dare") else []
        return f"{VIRTUAL_PREFIX}{self.strategy}({','.join(params)}):{terms}"

    @property
    def virtual_name(self) -> str:
        """The reserved adapter name of its virtual adapter (ties / dare): its label."""
        return self.label

    @property
    def slot_names(self) -> tuple[str, ...]:
        """The adapter names a request for this recipe holds slots of: each adapter (linear), or the virtual one."""
        return (self.virtual_name,) if self.virtual else self.names


def check_recipe(recipe: MergeRecipe, num_slots: int) -> None:
    """RecipeError when the recipe can never run on `num_slots` device slots (--max-loras): a linear merge holds
    one slot per adapter at once, so it would wait forever for more slots than there are."""
    need = len(recipe.slot_names)
    if need > num_slots:
        raise RecipeError("adapters", f"a linear merge of {need} adapters needs {need} device slots at once; this "
                                      f"server has --max-loras {num_slots} (use fewer adapters, or a ties / dare "
                                      "strategy, which merges into one slot)")


def is_virtual(name: str) -> bool:
    return name.startswith(VIRTUAL_PREFIX)


# ---- virtual adapters: the name -> recipe registry (engine thread writes, host loader threads read) ----
_remembered: OrderedDict[str, MergeRecipe] = OrderedDict()
_lock = threading.Lock()


def remember(recipe: MergeRecipe) -> str:
    """Make `recipe`'s virtual name resolvable (by `recipe_of`, the host loader, the SlotTable); its name."""
    name = recipe.virtual_name
    with _lock:
        _remembered[name] = recipe
        _remembered.move_to_end(name)
        while len(_remembered) > MAX_REMEMBERED:
            _remembered.popitem(last=False)
    return name


def recipe_of(name: str) -> MergeRecipe | None:
    """The recipe behind a virtual name (None: not a virtual name, or not remembered)."""
    with _lock:
        return _remembered.get(name)


def load_virtual(name: str, load: Callable[[str], AdapterWeights],
                 stop: Callable[[], bool] = lambda: False) -> AdapterWeights:
    """The host loader's reader for a virtual name: read the components through `load`, then merge. `stop()` is
    asked before each component and each module: True raises MergeCancelled."""
    recipe = recipe_of(name)
    if recipe is None:
        raise LookupError(f"unknown merge {name!r}")
    components = []
    for component in recipe.names:
        _check_stop(stop)
        components.append(_component(load, component))
    return merge_adapters(recipe, components, stop)


class MergeCancelled(Exception):
    """A merge whose result nobody wants any more (HostLoader.cancel / close) stopped early."""


def _check_stop(stop: Callable[[], bool]) -> None:
    if stop():
        raise MergeCancelled


def _component(load: Callable[[str], AdapterWeights], name: str) -> AdapterWeights:
    try:
        return load(name)
    except Exception as exc:  # the load fails with a reason naming the component at fault
        raise MergeLoadError(f"adapter {name!r} of the merge: {exc}") from exc


class MergeLoadError(RuntimeError):
    """A component of a virtual adapter could not be read."""


# ---- the math: PEFT's *_svd combinations ----------------------------------------------------------------
def merge_adapters(recipe: MergeRecipe, components: Sequence[AdapterWeights],
                   stop: Callable[[], bool] = lambda: False) -> AdapterWeights:
    """The virtual adapter of a ties / dare recipe from its components' weights (in recipe order): per module
    any component targets, the combined delta [out, in] truncated back to rank max(ranks), scale 1. `stop()` is
    asked before each module (MergeCancelled)."""
    if not recipe.virtual:
        raise ValueError("a linear merge runs over its adapters' own slots: there is no virtual adapter")
    rank = max(c.spec.max_declared_rank for c in components)  # PEFT: svd_rank or max(adapters' r)
    modules: dict[str, LoraModuleWeights] = {}
    for module in dict.fromkeys(m for c in components for m in c.modules):  # first appearance order
        _check_stop(stop)
        present = [i for i, c in enumerate(components) if module in c.modules]
        delta = combine_deltas(recipe, module, [_delta(components[i].modules[module]) for i in present], present)
        modules[module] = _truncate(delta, rank)
    kinds = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    size = sum(t.numel() * t.element_size() for m in modules.values() for t in (m.a, m.b))
    return AdapterWeights(LoraSpec(r=rank, lora_alpha=float(rank), target_modules=kinds), modules, size)


def combine_deltas(recipe: MergeRecipe, module: str, deltas: list[torch.Tensor], indices: list[int]
                   ) -> torch.Tensor:
    """One module's merged delta [out, in] from the deltas [out, in] of the adapters `indices` (recipe order)
    that target it, as peft.utils.merge_utils combines task tensors: prune (magnitude for ties, seeded random
    with rescale for dare; none at density 1, like PEFT), then sign election + disjoint merge (ties kinds) or a
    weighted sum (dare_linear)."""
    from peft.utils import merge_utils  # lazily: peft is heavy, and only a ties / dare load needs it

    weights = torch.tensor([recipe.weights[i] for i in indices])
    if recipe.density < 1.0:
        deltas = [_prune(recipe, module, i, d) for i, d in zip(indices, deltas, strict=True)]
    if recipe.strategy == "dare_linear":
        return merge_utils.task_arithmetic(deltas, weights)
    stacked = torch.stack(deltas, dim=0)  # [n, out, in]
    majority = merge_utils.calculate_majority_sign_mask(stacked, method=recipe.majority_sign_method)
    weighted = stacked * merge_utils.reshape_weight_task_tensors(stacked, weights)
    return merge_utils.disjoint_merge(weighted, majority)


def dare_generator(recipe: MergeRecipe, module: str, index: int) -> torch.Generator:
    """The CPU generator of DARE's drop mask for adapter `index` of the recipe in `module`."""
    digest = hashlib.sha256(f"{recipe.seed}\0{module}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _prune(recipe: MergeRecipe, module: str, index: int, delta: torch.Tensor) -> torch.Tensor:
    from peft.utils import merge_utils

    if recipe.strategy == "ties":
        return merge_utils.magnitude_based_pruning(delta, recipe.density)
    # merge_utils.random_pruning's formula with a seeded generator instead of the global RNG
    gen = dare_generator(recipe, module, index)
    mask = torch.bernoulli(torch.full_like(delta, recipe.density), generator=gen)
    return delta * mask / recipe.density


def _delta(m: LoraModuleWeights) -> torch.Tensor:
    """dW = (B @ A) * scale, [out, in] fp32: PEFT's get_delta_weight, op for op."""
    return (m.b.float() @ m.a.float()) * m.scale


def _truncate(delta: torch.Tensor, rank: int) -> LoraModuleWeights:
    """Rank-`rank` factors of delta [out, in] (PEFT's svd step): B = U[:, :r] diag(S[:r]) [out, r], A = Vh[:r]
    [r, in]. The reduced SVD has the same leading factors as PEFT's full one at a fraction of the memory
    (a full Vh of an MLP's down projection is in x in)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.shape[0])
    b = u[:, :r] @ torch.diag(s[:r])
    return LoraModuleWeights(vh[:r].contiguous(), b.contiguous(), 1.0)


# ---- recipe validation helpers ----------------------------------------------------------------------------
def _pairs(adapters: object) -> list[tuple[object, object]]:
    if not isinstance(adapters, Sequence) or isinstance(adapters, str):
        raise RecipeError("adapters", "expected a list of (name, weight) pairs")
    if not MIN_ADAPTERS <= len(adapters) <= MAX_ADAPTERS:
        raise RecipeError("adapters", f"a merge names {MIN_ADAPTERS} to {MAX_ADAPTERS} adapters, got {len(adapters)}")
    pairs = []
    for i, pair in enumerate(adapters):
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise RecipeError(f"adapters.{i}", f"expected a (name, weight) pair, got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _weight(value: object, i: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise RecipeError(f"adapters.{i}.weight", f"must be a finite number, got {value!r}")
    return float(value)


def _check_names(names: list[object]) -> None:
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or is_virtual(name):
            raise RecipeError(f"adapters.{i}.name", f"expected a registered adapter's name, got {name!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RecipeError("adapters", f"each adapter may appear once; repeated: {', '.join(map(repr, repeated))}")
