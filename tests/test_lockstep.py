"""``run_in_lockstep``: every batch sees exactly the values of its own forward, the callback
comes before a module runs on any batch, and a node it returns resumes the run there."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxquant.lockstep import run_in_lockstep

pytestmark = pytest.mark.usefixtures("one_thread")


class Shared(nn.Module):
    """A conv called at two sites with another conv between them (CARN-M's recursive blocks)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = torch.relu(self.b(self.a(x)))
        return self.c(self.b(y) + y) + x


def batches(count: int = 3) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, 6, 6, generator=g),) for _ in range(count)]


def test_inputs_are_bit_for_bit_those_of_separate_forwards():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Shared().eval())
    expected = []  # (module, batch) inputs in call order, from plain forwards
    for index, batch in enumerate(batches()):
        hooks = [m.register_forward_pre_hook(
            lambda mod, args, name=name, index=index: expected.append((name, index, args[0])))
            for name, m in gm.named_children()]
        gm(*batch)
        for h in hooks:
            h.remove()
    seen = []

    def before(node, inputs):
        seen.extend((node.target, i, args[0]) for i, args in enumerate(inputs))
        return None

    assert run_in_lockstep(gm, batches(), before) is None
    assert [(name, i) for name, i, _ in seen] == [
        (name, i) for name in ("a", "b", "b", "c") for i in range(3)]
    assert len(seen) == len(expected)
    for name, index, value in seen:
        matches = [v for n, i, v in expected if (n, i) == (name, index)]
        assert any(torch.equal(value, v) for v in matches), (name, index)


def test_a_module_changed_before_it_runs_is_changed_for_every_batch():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Shared().eval())
    reference = fx.symbolic_trace(Shared().eval())
    reference.load_state_dict(gm.state_dict())
    with torch.no_grad():
        reference.c.weight.mul_(2)
    outputs = {"gm": [], "reference": []}
    for key, module in (("gm", gm), ("reference", reference)):
        module.c.register_forward_hook(lambda mod, args, out, key=key: outputs[key].append(out))

    def before(node, inputs):
        if node.target == "c":
            with torch.no_grad():
                gm.c.weight.mul_(2)
        return None

    run_in_lockstep(gm, batches(), before)
    for batch in batches():
        reference(*batch)
    assert len(outputs["gm"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(outputs["gm"], outputs["reference"]))


def test_a_returned_node_resumes_the_run_there_with_the_values_of_that_moment():
    """Changing ``b`` at its second site and resuming at its first: every batch's inputs from
    then on are those of separate forwards of the changed model, and the nodes before the
    first site do not run again."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Shared().eval())
    first_b = next(n for n in gm.graph.nodes if n.name == "b")
    changed = fx.symbolic_trace(Shared().eval())
    changed.load_state_dict(gm.state_dict())
    with torch.no_grad():
        changed.b.weight.mul_(0.5)
    expected = []  # inputs to c from separate forwards of the changed model
    hook = changed.c.register_forward_pre_hook(lambda mod, args: expected.append(args[0]))
    for batch in batches():
        changed(*batch)
    hook.remove()
    visits, seen_c = [], []

    def before(node, inputs):
        visits.append(node.name)
        if node.name == "b_1" and visits.count("b_1") == 1:
            with torch.no_grad():
                gm.b.weight.mul_(0.5)
            return first_b
        if node.name == "c":
            seen_c.extend(args[0] for args in inputs)
        return None

    run_in_lockstep(gm, batches(), before, keep_at={first_b})
    assert visits == ["a", "b", "b_1", "b", "b_1", "c"]
    assert len(seen_c) == 3 and all(torch.equal(a, b) for a, b in zip(seen_c, expected))


def test_resuming_needs_a_kept_node_the_run_reached_and_until_stops_it():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Shared().eval())
    nodes = {n.name: n for n in gm.graph.nodes}
    with pytest.raises(ValueError, match="cannot resume at 'a'"):  # not kept
        run_in_lockstep(gm, batches(), lambda node, inputs: nodes["a"] if node.name == "b" else None)
    with pytest.raises(ValueError, match="cannot resume at 'c'"):  # kept, not reached
        run_in_lockstep(gm, batches(), lambda node, inputs: nodes["c"] if node.name == "b" else None,
                        keep_at={nodes["c"]})
    with pytest.raises(ValueError, match="keep_at takes call_module nodes"):
        run_in_lockstep(gm, batches(), lambda node, inputs: None, keep_at={nodes["x"]})
    visits = []
    run_in_lockstep(gm, batches(), lambda node, inputs: visits.append(node.name),
                    until=nodes["b"])
    assert visits == ["a", "b"]
