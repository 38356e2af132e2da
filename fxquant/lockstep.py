"""Running several batches through a graph node by node, all batches at each node before the
next, so that a pass can change a module between the moment every batch's input reached it
and the moment it runs (FSWA adjusts each conv from the inputs the adjusted convs before it
deliver)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import fx


def run_in_lockstep(gm: fx.GraphModule, batches: Sequence[tuple],
                    before: Callable[[fx.Node, list[tuple]], bool],
                    until: fx.Node | None = None) -> bool:
    """Run ``batches`` through ``gm`` in lockstep: at every ``call_module`` node,
    ``before(node, inputs)`` is called with each batch's positional arguments to the module
    (in batch order) before the module runs on any of them. When it returns True (it changed
    something that already ran, so the values after it are stale) the run is abandoned and
    False returned; otherwise the run goes on to ``until`` (default: the whole graph) and
    returns True. Outputs are discarded.

    Each batch runs the very ops ``gm(*batch)`` runs (one :class:`fx.Interpreter` per
    batch), so values are those of separate forwards; what changes is only the order, and
    that every batch's live values are held at once (freed after their last use)."""
    runners = []
    for batch in batches:
        runner = fx.Interpreter(gm)  # frees each value after its last use
        runner.args_iter = iter(batch)  # what Interpreter.run sets up for its placeholders
        runners.append(runner)
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        if node.op == "call_module":
            if before(node, [runner.fetch_args_kwargs_from_env(node)[0] for runner in runners]):
                return False
        for runner in runners:
            runner.env[node] = runner.run_node(node)
            for dead in runner.user_to_last_uses.get(node, []):
                del runner.env[dead]
        if node is until:
            break
    return True
