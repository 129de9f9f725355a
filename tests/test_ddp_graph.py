"""DistributedDataParallel's condition, checked on CPU without a process group.

With ``find_unused_parameters=True`` DDP marks as used every parameter reachable from the autograd
graph of the tensors the wrapped module RETURNS, and then waits for a gradient of each of them; a
parameter reachable from the returned outputs but not from the loss gets none, and the next step
fails ("Expected to have finished reduction in the prior iteration"). So for TrainStep: every
parameter reachable from its returned outputs must receive a gradient from the total."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_experiment
from core.config import validate
from core.trainer import TrainStep, build, train_loader

TEXT = {"width": 32, "depth": 1, "heads": 2, "context_length": 16}


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def reachable_parameters(outputs) -> set[int]:
    """ids of the leaf parameters in the autograd graph of every tensor in ``outputs``."""
    seen, found, stack = set(), set(), [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    found |= {id(t) for t in _tensors(outputs) if t.requires_grad and t.grad_fn is None}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return found


CASES = {
    "text_tower_without_text_loss": {"model.text": TEXT},  # supervision.yaml's reconstruction cell
    "contrastive_not_started": {"model.text": TEXT, "losses": [{"type": "pixel"}, {"type": "quantizer"},
                                                             {"type": "contrastive", "start_step": 5}]},
    "contrastive_active": {"model.text": TEXT, "losses": [{"type": "pixel"}, {"type": "quantizer"}, {"type": "contrastive"}]},
    "adversarial_not_started": {"losses": [{"type": "pixel"}, {"type": "quantizer"},
                                           {"type": "adversarial", "start_step": 5, "discriminator": {"type": "patchgan", "width": 8, "depth": 1}}]},
}


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_reachable_from_the_returned_outputs_gets_a_gradient(case):
    exp = validate(tiny_experiment(**CASES[case]))
    built = build(exp)
    step = TrainStep(built.model, built.losses, built.labels)
    batch = next(train_loader(built.train_set, exp.train, 0, 0))
    total, outputs, logs = step(batch, 0)
    reachable = reachable_parameters((total, outputs, logs))
    total.backward()
    params = {id(p): n for n, p in step.named_parameters()}
    no_grad = sorted(params[i] for i in reachable if i in params and dict(step.named_parameters())[params[i]].grad is None)
    assert not no_grad, f"reachable from the outputs but no gradient (DDP would fail): {no_grad[:5]}"
