"""Graph surgery primitives shared by passes."""
from __future__ import annotations

import copy

import torch
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


def own_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module `node` calls, made private to it: copied under a new name if anything else uses it.

    "Anything else" is another call of the same module object, or a `get_attr` of one of its tensors.
    Call it before changing a module's parameters for one call site only.
    """
    module = gm.get_submodule(node.target)
    if not _module_is_shared(gm, node, module):
        return module
    private = copy.deepcopy(module)
    name = unique_name(gm, node.target)
    gm.add_submodule(name, private)
    node.target = name
    return private


def _module_is_shared(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> bool:
    names = {name for name, m in gm.named_modules(remove_duplicate=False) if m is module}
    for other in gm.graph.nodes:
        if other is node:
            continue
        if other.op == "call_module" and other.target in names:
            return True
        if other.op == "get_attr" and any(other.target.startswith(name + ".") for name in names):
            return True
    return False


def set_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` of `owner` by `value`, keeping its kind and `requires_grad`."""
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(owner, name, value)


def bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a one-input node: its users read its first argument instead."""
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead code and unused submodules, lint and recompile."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
