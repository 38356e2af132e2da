"""Running several batches through a graph node by node, all batches at each node before the
next, so that a pass can change a module between the moment every batch's input reached it
and the moment it runs (FSWA adjusts each conv from the inputs the adjusted convs before it
deliver)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from torch import fx


def run_in_lockstep(gm: fx.GraphModule, batches: Sequence[tuple],
                    before: Callable[[fx.Node, list[tuple]], fx.Node | None],
                    until: fx.Node | None = None,
                    keep_at: Collection[fx.Node] = ()) -> None:
    """Run ``batches`` through ``gm`` in lockstep: at every ``call_module`` node,
    ``before(node, inputs)`` is called with each batch's positional arguments to the module
    (in batch order) before the module runs on any of them. It returns None to go on, or a
    node of ``keep_at`` that already ran: it changed a module that ran there, so what that
    node and the nodes after it computed is stale, and every batch resumes from the values it
    held just before that node (kept when the run reached it). The run ends at ``until``
    (default: the whole graph); outputs are discarded.

    Each batch runs the very ops ``gm(*batch)`` runs (one :class:`fx.Interpreter` per
    batch), so values are those of separate forwards; what changes is only the order, and
    that every batch's live values are held at once (freed after their last use, unless a
    node of ``keep_at`` still holds them). Resuming where the change took effect, instead of
    from the graph's input, spares the nodes before it: FSWA refits CARN-M's shared
    residual block at each of its call sites, and rerunning the calibration batches from the
    input every time took about half of the pass's 22 s (docs/performance.md, "Calibration,
    level fitting and FSWA in half the time")."""
    if any(node.op != "call_module" for node in keep_at):
        raise ValueError("lockstep: keep_at takes call_module nodes (a run resumes only where "
                         "before() is called)")
    runners = []
    for batch in batches:
        runner = fx.Interpreter(gm)  # frees each value after its last use
        runner.args_iter = iter(batch)  # what Interpreter.run sets up for its placeholders
        runners.append(runner)
    nodes = [node for node in gm.graph.nodes if node.op != "output"]
    position = {node: i for i, node in enumerate(nodes)}
    kept: dict[fx.Node, list[dict]] = {}
    i = 0
    while i < len(nodes):
        node = nodes[i]
        if node in keep_at:  # references to the live values, not copies
            kept[node] = [dict(runner.env) for runner in runners]
        if node.op == "call_module":
            back = before(node, [runner.fetch_args_kwargs_from_env(node)[0] for runner in runners])
            if back is not None:
                if back not in kept or position[back] > i:
                    raise ValueError(f"lockstep: cannot resume at '{getattr(back, 'name', back)}':"
                                     " only at a node of keep_at that the run has reached")
                for runner, env in zip(runners, kept[back]):
                    runner.env = dict(env)
                i = position[back]
                continue
        for runner in runners:
            runner.env[node] = runner.run_node(node)
            for dead in runner.user_to_last_uses.get(node, []):
                del runner.env[dead]
        if node is until:
            break
        i += 1
