"""Graph surgery primitives shared by passes."""
from __future__ import annotations

from torch import fx, nn


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Swap the submodule at qualified name `target` for `new` (same graph node)."""
    parent_name, _, child = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, new)


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """A qualified submodule name derived from `base` that is not taken yet."""
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def insert_module_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str,
                        users: list[fx.Node] | None = None) -> fx.Node:
    """Add `module` as a new call reading `node`; `users` (default: all of node's users) now read it."""
    users = list(node.users) if users is None else users
    name = unique_name(gm, name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    for user in users:
        user.replace_input_with(node, new)
    return new


def insert_module_before(gm: fx.GraphModule, consumer: fx.Node, producer: fx.Node, module: nn.Module,
                         name: str) -> fx.Node:
    """Insert `module` on the edge producer -> consumer only (other readers of producer are unchanged)."""
    return insert_module_after(gm, producer, module, name, users=[consumer])


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead code and unused submodules, lint and recompile."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
