"""AdamW stepped inside backward, one decoder layer at a time (JobSpec.optimizer_in_backward).

Without it every gradient exists at once at the end of backward, until optimizer.step(): for full
fine-tuning in bf16 that is the whole model's size again on top of weights and AdamW state. Here a
post-accumulate-grad hook counts each decoder layer's gradients as backward produces them; when
the layer's last one has arrived its AdamW step runs at once and the gradients are freed, so at
most one layer's gradients are alive besides those of the parameters outside the layers
(embeddings, a tied head, the final norm), which wait for the ordinary step() after backward.

Backward reaches a layer's parameters only after every node that used them, so updating them
there changes nothing that backward still reads. What it gives up: clipping to the global norm
(unknown until the last gradient) and gradient accumulation; spec.py refuses both. The gradient
norm is still measured, on the GPU, for the step's metrics.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

# The first ".<number>." of a parameter's name is its layer: model.layers.7.mlp.up_proj.weight.
_LAYER = re.compile(r"^(.*?\.\d+)\.")


def layer_of(name: str) -> str | None:
    match = _LAYER.match(name)
    return match.group(1) if match else None


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


class _Bucket:
    """One layer's parameters (or the rest) and the AdamW that updates only them."""

    def __init__(self, key: str, groups: list[tuple[dict[str, Any], list[torch.nn.Parameter]]],
                 make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]) -> None:
        self.key = key
        self.sources = [source for source, _ in groups]
        self.params = [p for _, params in groups for p in params]
        self.optimizer = make([{**{k: v for k, v in source.items() if k != "params"}, "params": params}
                               for source, params in groups])
        self.waiting = len(self.params)

    def step(self, norm_sq: torch.Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        norm_sq.add_(torch.stack(torch._foreach_norm(grads)).float().square().sum())
        # The scheduler writes the rate into the wrapper's groups; each step takes it from there.
        for source, group in zip(self.sources, self.optimizer.param_groups):
            group["lr"], group["weight_decay"] = source["lr"], source["weight_decay"]
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.waiting = len(self.params)


class OptimizerInBackward(torch.optim.Optimizer):
    """An optimizer whose layer updates happen in backward; step() updates the rest.

    param_groups are the ordinary groups of trainer.optim.param_groups, so the learning-rate
    scheduler drives it like any optimizer; make builds the AdamW of one bucket from its groups.
    """

    def __init__(self, named: Iterable[tuple[str, torch.nn.Parameter]], groups: list[dict[str, Any]],
                 make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]) -> None:
        super().__init__(groups, defaults={})
        names: dict[int, list[str]] = {}
        for name, p in named:
            names.setdefault(id(p), []).append(name)
        by_key: dict[str, list[tuple[dict[str, Any], list[torch.nn.Parameter]]]] = {}
        for group in self.param_groups:
            split: dict[str, list[torch.nn.Parameter]] = {}
            for p in group["params"]:
                seen = names.get(id(p), [])
                layers = {layer_of(n) for n in seen}
                # A parameter shared by two places (a tied head, one layer reused) waits for step().
                key = layers.pop() if len(seen) == 1 and None not in layers else ""
                split.setdefault(key, []).append(p)
            for key, params in split.items():
                by_key.setdefault(key, []).append((group, params))
        self.buckets = [_Bucket(key, parts, make) for key, parts in sorted(by_key.items())]
        self.rest = next((b for b in self.buckets if b.key == ""), None)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._counted: set[int] = set()  # parameters whose gradient arrived since the last step()
        device = self.param_groups[0]["params"][0].device
        self._norm_sq = torch.zeros((), device=device, dtype=torch.float32)
        # The hooks hold the optimizer weakly: a strong reference from its own parameters would be a
        # cycle, and the weights and AdamW state would outlive the job until a garbage collection.
        me = weakref.ref(self)

        def arrived(p: torch.Tensor) -> None:
            optimizer = me()
            if optimizer is not None:
                optimizer._arrived(p)

        self._handles = [p.register_post_accumulate_grad_hook(arrived)
                         for b in self.buckets if b is not self.rest for p in b.params]
        weakref.finalize(self, _remove, self._handles)

    @property
    def layer_buckets(self) -> int:
        return sum(b is not self.rest for b in self.buckets)

    def _arrived(self, p: torch.Tensor) -> None:
        # Autograd sums every use of a parameter before this hook runs, so it runs once per
        # backward; a second time before step() means a second backward, i.e. accumulation.
        if id(p) in self._counted:
            raise RuntimeError(
                "optimizer_in_backward: a parameter received a second gradient before step() (two backward passes "
                "per step, i.e. gradient accumulation); it needs one backward per optimizer step"
            )
        self._counted.add(id(p))
        bucket = self._bucket_of[id(p)]
        bucket.waiting -= 1
        if bucket.waiting == 0:
            bucket.step(self._norm_sq)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        # The rest, and any layer some of whose parameters got no gradient this backward.
        for bucket in self.buckets:
            if bucket is self.rest or bucket.waiting != len(bucket.params):
                bucket.step(self._norm_sq)
        self._counted.clear()

    def take_grad_norm(self) -> torch.Tensor:
        """The norm of the last backward's whole gradient (a GPU scalar: reading it is the caller's sync)."""
        norm = self._norm_sq.sqrt()
        self._norm_sq = torch.zeros_like(self._norm_sq)
        return norm

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        # The groups' rates too: a resumed scheduler only writes them at its next step.
        return {"buckets": {b.key: b.optimizer.state_dict() for b in self.buckets},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict.get("buckets")
        if saved is None or set(saved) != {b.key for b in self.buckets}:
            raise ValueError("optimizer_in_backward: the checkpoint's optimizer state was not saved with "
                             "optimizer_in_backward, or for another model; resume with the setting it was made with")
        for bucket in self.buckets:
            bucket.optimizer.load_state_dict(saved[bucket.key])
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved_group)
