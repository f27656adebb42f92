"""collapse: push every Selector towards the producer of its tensor and absorb it there (exact).

Seed 003 §2.2/§2.6: a feature selector ``C^T`` commutes with elementwise and per-channel ops, so
``C^T sigma(W x) = sigma(C^T W x)`` and the selector folds into the previous layer as ``C^T W`` (its
rows at the kept indices). Each Selector moves through the commutation rules of
`fxcompress.selector` until a Linear/Conv absorbs it. A tensor read by several consumers (a residual
stream, a DenseNet concatenation input) is shrunk to the union of what its readers select, each keeping
its selection relative to that union; a selector that cannot move stays as a dynamic sampler
(``index_select``, ONNX ``Gather``) -- seed 003 §2.6's "dynamic" application.

Moving a selector through a sum or a concatenation splits it into one per operand; those that are
not absorbed would make the model gather more often than before. So once no selector moves, the
leftovers are regrouped (a concatenation's selected inputs into one selector after it, a selector
whose readers all select into theirs), and if the graph still has more selectors than it came with,
the original is collapsed again with only the moves that never add a selector. The pass therefore
never leaves more dynamic gathers than it received.
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import fx

from fxcompress import PassConfig, register_pass
from fxcompress.errors import FxCompressError
from fxcompress.graph.shapes import propagate_shapes
from fxcompress.rewrite import bypass, finish, insert_module_after, insert_module_before
from fxcompress.selector import (Commutation, Selection, Selector, Site, argument, commutation_rule, describe,
                                 is_tensor_shape, set_selection)


class CollapseConfig(PassConfig):
    max_rounds: int = Field(50, ge=1, description="sweeps over the selectors before giving up on a fixed point")


@dataclass
class CollapseSummary:
    """What `collapse_selectors` did: `absorbed` names the layers and constants that ended a selector,
    `narrowed` every module made smaller, `regrouped` counts selectors removed by regrouping leftovers,
    `dynamic` maps each remaining Selector node to why it stays, and `cautious` says the free moves left
    more selectors than there were, so only moves that never add one were made."""
    selectors_before: int = 0
    absorbed: list[str] = field(default_factory=list)
    merged: int = 0
    regrouped: int = 0
    narrowed: list[dict] = field(default_factory=list)
    dynamic: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    converged: bool = True
    cautious: bool = False


def is_selector(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), Selector)


def selector_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if is_selector(gm, node)]


def _inputs_like(gm: fx.GraphModule, inputs: tuple) -> tuple:
    """`inputs` cast to the floating dtype of `gm`'s parameters (a float64 copy under verification)."""
    dtype = next((t.dtype for t in gm.state_dict().values() if torch.is_floating_point(t)), None)
    return tuple(t.to(dtype) if dtype is not None and torch.is_floating_point(t) else t for t in inputs)


def node_shapes(gm: fx.GraphModule, example_inputs: tuple) -> dict[fx.Node, tuple | None]:
    names = propagate_shapes(gm, _inputs_like(gm, example_inputs))
    return {node: names.get(node.name) for node in gm.graph.nodes}


class _Collapser:
    """The fixed-point iteration and the regrouping after it, on one GraphModule.

    With `cautious`, a move is made only if it cannot add a selector (no splitting at sums and
    concatenations, no union unless it replaces a reader's selector), so the count never grows.
    """

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple | None], cautious: bool = False):
        self.gm, self.shapes, self.cautious = gm, shapes, cautious
        self.summary = CollapseSummary(selectors_before=len(selector_nodes(gm)), cautious=cautious)
        self.stuck: dict[fx.Node, str] = {}
        self.erased: set[fx.Node] = set()
        self.device = next((t.device for t in gm.state_dict().values()), torch.device("cpu"))

    def run(self, max_rounds: int) -> CollapseSummary:
        for round_ in range(1, max_rounds + 1):
            self.summary.rounds = round_
            if not self._sweep():
                break
        else:
            self.summary.converged = False
        self._regroup()
        self.summary.dynamic = {node.name: self.stuck.get(node, "not examined") for node in selector_nodes(self.gm)}
        return self.summary

    def _sweep(self) -> bool:
        """Move every selector as far as it goes; True if anything changed."""
        work, moved = deque(reversed(selector_nodes(self.gm))), False
        while work:
            node = work.popleft()
            if node in self.erased:
                continue
            new = self._step(node)
            if new is not None:
                moved = True
                work.extend(new)
        return moved

    def _step(self, node: fx.Node) -> list[fx.Node] | None:
        """One move of the selector `node`: the selectors it created or changed, or None if it is stuck."""
        source = node.args[0]
        shape = self.shapes.get(source)
        if not is_tensor_shape(shape) or not shape:
            return self._stuck(node, f"the shape of {describe(self.gm, source)} is unknown")
        selection = Selection.of(self.gm.get_submodule(node.target), len(shape))
        if selection.is_identity:
            self._remove(node)
            return []
        if len(source.users) > 1:
            return self._unite(node, source, selection)
        return self._push(node, source, selection)

    def _stuck(self, node: fx.Node, reason: str) -> None:
        self.stuck[node] = reason
        return None

    # --- a tensor with several readers: shrink it to the union of what they read ------------------------

    def _unite(self, node: fx.Node, source: fx.Node, selection: Selection) -> list[fx.Node] | None:
        readers = {}
        for user in source.users:
            read = self._selection_of(user)
            if read is None or read.dim != selection.dim:
                return self._stuck(node, f"{describe(self.gm, source)} is also read whole by "
                                         f"{describe(self.gm, user)}")
            readers[user] = read
        union = Selection(selection.dim, torch.unique(torch.cat([r.keep for r in readers.values()])),
                          selection.size)
        if union.is_identity:
            return self._stuck(node, f"the readers of {describe(self.gm, source)} together use all of its "
                                     f"{selection.size} entries on dim {selection.dim}")
        plan = self._plan(source, union)
        if isinstance(plan, str):
            return self._stuck(node, f"the readers of {describe(self.gm, source)} use {union.count} of its "
                                     f"{union.size} entries on dim {union.dim}, but {plan}")
        relatives = {user: read.within(union) for user, read in readers.items()}
        replaced = sum(relative.is_identity for relative in relatives.values())
        if self._would_add(_fragments(*plan), replaced):
            return self._stuck(node, f"the readers of {describe(self.gm, source)} select different entries: "
                                     "shrinking it to their union would leave a selector for each reader besides "
                                     "those the union leaves upstream")
        united = self._insert(source, union, users=list(readers))
        for user, relative in relatives.items():
            if relative.is_identity:
                self._remove(user)
            else:
                set_selection(self.gm, user, relative)
        return self._commit(united, source, union, *plan)

    def _selection_of(self, node: fx.Node) -> Selection | None:
        if not is_selector(self.gm, node):
            return None
        shape = self.shapes.get(node.args[0])
        return Selection.of(self.gm.get_submodule(node.target), len(shape)) if is_tensor_shape(shape) else None

    # --- a tensor read by this selector alone: move it through the producer -------------------------

    def _push(self, node: fx.Node, source: fx.Node, selection: Selection) -> list[fx.Node] | None:
        plan = self._plan(source, selection)
        if isinstance(plan, str):
            return self._stuck(node, plan)
        if self._would_add(_fragments(*plan), 1):
            return self._stuck(node, f"moving it through {describe(self.gm, source)} would split it into "
                                     f"{_fragments(*plan)} selectors")
        return self._commit(node, source, selection, *plan)

    def _would_add(self, created: int, removed: int) -> bool:
        """Whether a move creating `created` selectors and removing `removed` is refused (cautious mode)."""
        return self.cautious and created > removed

    def _plan(self, source: fx.Node, selection: Selection) -> tuple[Commutation, dict] | str:
        """How `selection` of `source`'s output would move (nothing changes yet), or why it cannot."""
        if source.op == "placeholder":
            return f"it selects the graph input {describe(self.gm, source)}"
        rule = commutation_rule(self.gm, source)
        if rule is None:
            return (f"no commutation rule for {describe(self.gm, source)}: declare one with "
                    "fxcompress.selector.register_commutation")
        try:
            move = rule(Site(self.gm, source, selection, self.shapes))
        except Exception as exc:
            raise FxCompressError(f"the commutation rule {getattr(rule, '__name__', rule)} failed on "
                                  f"{describe(self.gm, source)} ({type(exc).__name__}: {exc}): fix the rule, or "
                                  "register one returning None for selections it cannot move") from exc
        if move is None:
            return f"{describe(self.gm, source)} does not commute with a selection on dim {selection.dim}"
        edges = self._edges(move.inputs)
        if edges is None:
            return f"{describe(self.gm, source)} reads one tensor twice with different selections"
        if move.residual is not None and move.residual.size == selection.size:
            return f"{describe(self.gm, source)} can pass none of the selection upstream"
        return move, edges

    @staticmethod
    def _edges(inputs: list[tuple[fx.Node, Selection]]) -> dict[fx.Node, Selection] | None:
        edges: dict[fx.Node, Selection] = {}
        for tensor, selection in inputs:
            if tensor in edges and not edges[tensor].same_as(selection):
                return None
            edges[tensor] = selection
        return edges

    def _commit(self, node, source, selection, move, edges) -> list[fx.Node]:
        if move.apply is not None:
            move.apply()
        produced = move.residual.size if move.residual is not None else selection.count
        self._resize(source, selection.dim, produced)
        new = []
        if move.residual is not None:
            set_selection(self.gm, node, move.residual)
            new.append(node)
        else:
            self._remove(node)
        for tensor, read in edges.items():
            if not read.is_identity:
                new.append(self._insert(tensor, read, consumer=source))
        self._record(source, selection, produced, move, edges)
        return new

    def _record(self, source, selection, produced, move, edges) -> None:
        if source.op == "call_module" and move.apply is not None and not is_selector(self.gm, source):
            module = self.gm.get_submodule(source.target)
            self.summary.narrowed.append({"name": source.target, "type": type(module).__name__,
                                          "dim": selection.dim, "kept": produced, "of": selection.size})
        if not edges and move.residual is None:
            if is_selector(self.gm, source):
                self.summary.merged += 1
            else:
                self.summary.absorbed.append(str(source.target))

    # --- regrouping what stays dynamic ----------------------------------------------------------------------

    def _regroup(self) -> None:
        """Rewrite leftover selectors into fewer, exactly, until no rewrite applies."""
        changed = True
        while changed:
            changed = False
            for node in list(self.gm.graph.nodes):
                if node in self.erased:
                    continue
                if node.op == "call_function" and node.target in _CATS:
                    changed |= self._gather_after_cat(node)
                elif is_selector(self.gm, node):
                    changed |= self._compose_into_readers(node)

    def _gather_after_cat(self, cat: fx.Node) -> bool:
        """``cat([s1(a), s2(b), c])`` along the selectors' dim becomes ``s(cat([a, b, c]))``: one gather for
        the selectors read by this concatenation alone (at least two)."""
        tensors, dim, shape = argument(cat, 0, "tensors"), argument(cat, 1, "dim", 0), self.shapes.get(cat)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or not is_tensor_shape(shape) or \
                not all(isinstance(t, fx.Node) and is_tensor_shape(self.shapes.get(t)) for t in tensors):
            return False
        dim %= len(shape)
        selected = [t for t in tensors if tensors.count(t) == 1 and len(t.users) == 1
                    and getattr(self._selection_of(t), "dim", None) == dim]
        if len(selected) < 2:
            return False
        parts, offset = [], 0
        for tensor in tensors:
            read = self._selection_of(tensor) if tensor in selected else None
            size = read.size if read is not None else self.shapes[tensor][dim]
            parts.append(offset + (read.keep if read is not None else torch.arange(size)))
            offset += size
        for tensor in selected:
            self._remove(tensor)
        self._resize(cat, dim, offset)
        gathered = self._insert(cat, Selection(dim, torch.cat(parts), offset))
        self.stuck[gathered] = (f"regrouped after {describe(self.gm, cat)}: the selections of {len(selected)} of "
                                "its inputs were not absorbed upstream")
        self.summary.regrouped += len(selected) - 1
        return True

    def _compose_into_readers(self, node: fx.Node) -> bool:
        """A selector read only by selectors of the same dim is folded into each of them."""
        selection = self._selection_of(node)
        readers = [(user, self._selection_of(user)) for user in node.users]
        if selection is None or not readers or \
                any(read is None or read.dim != selection.dim for _, read in readers):
            return False
        for user, read in readers:
            set_selection(self.gm, user, selection.then(read))
        self._remove(node)
        self.summary.regrouped += 1
        return True

    # --- graph edits that keep `shapes` current ----------------------------------------------------------

    def _resize(self, node: fx.Node, dim: int, size: int) -> None:
        shape = list(self.shapes[node])
        shape[dim] = size
        self.shapes[node] = tuple(shape)

    def _insert(self, tensor: fx.Node, selection: Selection, *, consumer: fx.Node | None = None,
                users: list[fx.Node] | None = None) -> fx.Node:
        selector = Selector(selection.dim, selection.keep, selection.size).to(self.device)
        name = f"{tensor.name}_select"
        new = insert_module_before(self.gm, consumer, tensor, selector, name) if consumer is not None else \
            insert_module_after(self.gm, tensor, selector, name, users=users)
        self.shapes[new] = self.shapes[tensor]
        self._resize(new, selection.dim, selection.count)
        return new

    def _remove(self, node: fx.Node) -> None:
        bypass(self.gm, node)
        self.erased.add(node)
        self.stuck.pop(node, None)


_CATS = (torch.cat, torch.concat, torch.concatenate)


def _fragments(move: Commutation, edges: dict[fx.Node, Selection]) -> int:
    """How many selectors a move leaves: one per selected input, plus the residual after the node."""
    return sum(not read.is_identity for read in edges.values()) + (move.residual is not None)


def collapse_selectors(gm: fx.GraphModule, example_inputs: tuple,
                       max_rounds: int = 50) -> tuple[fx.GraphModule, CollapseSummary]:
    """Move the Selectors of `gm` upstream and absorb them; the caller recompiles (`finish`).

    Returns the collapsed GraphModule, which has no more selectors than `gm` had, and the summary. The
    result is `gm` itself, changed in place, or -- when moving freely left more selectors even after
    regrouping -- a copy of the original collapsed cautiously; either way use the result, not `gm`.
    `example_inputs` give the tensor shapes the rules need (run once, in `gm`'s dtype).
    """
    original = copy.deepcopy(gm)
    summary = _Collapser(gm, node_shapes(gm, example_inputs)).run(max_rounds)
    if len(summary.dynamic) <= summary.selectors_before:
        return gm, summary
    return original, _Collapser(original, node_shapes(original, example_inputs), cautious=True).run(max_rounds)


def _report(ctx, summary: CollapseSummary, params_removed: int) -> None:
    dynamic = len(summary.dynamic)
    ctx.note(f"{summary.selectors_before} selector(s) in, {dynamic} left dynamic (index_select / ONNX Gather); "
             f"{len(summary.absorbed)} absorbed into layers, {summary.merged} merged into another selector, "
             f"{summary.regrouped} removed by regrouping leftovers "
             f"(selectors split at sums and concatenations, so these need not add up); "
             f"{params_removed:,} parameters removed in {summary.rounds} round(s)")
    if summary.cautious:
        ctx.note("moving selectors freely left more of them than there were: collapsed again with only the moves "
                 "that never add a selector")
    if not summary.converged:
        ctx.note(f"no fixed point after max_rounds={summary.rounds}: raise `max_rounds` to move the rest")
    for row in summary.narrowed:
        ctx.record_layer(action="narrowed", **row)
    for name, reason in summary.dynamic.items():
        ctx.record_layer(action="dynamic", name=name, reason=reason)


@register_pass("collapse", config=CollapseConfig, exact=True)
def collapse(gm, ctx, config):
    """Push every Selector upstream through per-entry ops and absorb it into the Linear/Conv that produces
    its tensor; what cannot move (graph inputs, shared tensors read whole, ops without a rule) stays a
    dynamic sampler."""
    params_before = sum(p.numel() for p in gm.parameters())
    gm, summary = collapse_selectors(gm, ctx.example_inputs, config.max_rounds)
    gm = finish(gm)
    _report(ctx, summary, params_before - sum(p.numel() for p in gm.parameters()))
    return gm
