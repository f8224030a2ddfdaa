"""No step of the real trainer makes the host wait for a device-computed value.

On a GPU the host waits whenever an op needs a device value on the host: `.item()`, `int()`,
`bool()` (an `if` on a tensor), `torch.equal`, and ops whose output size depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`, `unique`). On a CPU nothing waits, so this
test tracks, during Run.train on the tiny model, which tensors are device-computed: the model's
parameters and everything computed from them, and the batch as the loop sends it to the device
(`.to(device, non_blocking=True)`, made a distinct tensor here as it is on a GPU). Any of those ops
on such a tensor is a host sync; the one allowed read of a step's values is trainer.step_values'
LateRead (a copy read a step late, which is no op here). A check with a planted sync shows the
tracker sees one.

Counted are the ops tuneq's own code asks for (the innermost frame outside torch is not an
installed library's). Libraries' are outside its reach here: on a CPU transformers' packed-sequence mask
reads the position ids back on every forward, which on a GPU trainer.packed_attention replaces.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import trainer
import trainer.loop
from trainer.job import run_job

TRAINER_DIR = str(Path(trainer.__file__).parent)
aten = torch.ops.aten
# Ops that read a value back to the host, or size their output by the data.
SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
           aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
           aten.unique_dim.default, aten.repeat_interleave.Tensor}


class DeviceValues(TorchDispatchMode):
    """Taints the outputs of every op with a tainted input; records syncing ops on tainted tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()
        self.syncs: list[str] = []
        self.library_syncs: list[str] = []

    def taint(self, t: torch.Tensor) -> None:
        if id(t) not in self.ids:
            self.ids.add(id(t))
            weakref.finalize(t, self.ids.discard, id(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        hit = any(id(a) in self.ids for a in inputs)
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool and id(i) in self.ids for i in tree_leaves(args[1:]))
        if hit and (func in SYNCING or bool_index):
            library, where = _asked_from()
            (self.library_syncs if library else self.syncs).append(f"{func} at {where}")
        out = func(*args, **kwargs)
        if hit:
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.taint(o)
        return out


def _asked_from() -> tuple[bool, str]:
    """(whether an installed library asked for the op, where): the innermost frame outside torch,
    and the trainer's frame that led there."""
    frame, where, library = sys._getframe(2), [], False
    while frame is not None and len(where) < 2:
        name = frame.f_code.co_filename
        if not where and "/torch/" not in name:
            library = "site-packages" in name
            where.append(f"{'/'.join(Path(name).parts[-2:])}:{frame.f_lineno}")
        elif where and name.startswith(TRAINER_DIR):
            where.append(f"{'/'.join(Path(name).parts[-2:])}:{frame.f_lineno}")
        frame = frame.f_back
    return library, " < ".join(where)


@pytest.fixture
def device_values(monkeypatch: pytest.MonkeyPatch) -> DeviceValues:
    mode = DeviceValues()
    train = trainer.loop.Run.train

    def traced_train(self, *args, **kwargs):
        for p in self.model.parameters():
            mode.taint(p)
        with mode:
            return train(self, *args, **kwargs)

    monkeypatch.setattr(trainer.loop.Run, "train", traced_train)
    to = torch.Tensor.to

    def to_device(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if kwargs.get("non_blocking") and out is self:
            # On a GPU the copy is a device tensor of its own; the host's batch stays the host's.
            out = self.clone()
            mode.taint(out)
        return out

    monkeypatch.setattr(torch.Tensor, "to", to_device)
    return mode


@pytest.mark.parametrize("planted", [False, True])
def test_training_steps_read_no_device_value(make_spec, tmp_path, device_values, monkeypatch, planted):
    if planted:  # a per-step `.item()` of the step's values: the kind of sync this test is for
        queue = trainer.loop.queue_forward_backward

        def syncing(*args, **kwargs):
            values = queue(*args, **kwargs)
            bool(values[0] > 0)  # an `if` on a device value
            return values

        monkeypatch.setattr(trainer.loop, "queue_forward_backward", syncing)
    spec = make_spec("lora", packing=True, hyperparameters={"max_steps": 4, "batch_size": 2, "max_seq_len": 32,
                                                            "gradient_accumulation_steps": 2, "warmup_steps": 0})
    assert run_job(spec, tmp_path / "run") == 0
    assert len(device_values.ids) > 0  # the tracker saw the step's tensors
    if planted:
        assert len(device_values.syncs) == 4, device_values.syncs  # one per step
        assert all("test_trainer_host_syncs.py" in s and "loop.py" in s for s in device_values.syncs)
    else:
        assert device_values.syncs == []
