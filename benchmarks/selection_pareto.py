"""Accuracy vs parameters of LeNet-300-100 on MNIST when hidden neurons are removed (not a test).

Three ways to remove the same fraction of the hidden neurons of fc1 and fc2 (fc1 keeps reading all
784 pixels, fc3 all 10 outputs):

* reconstruction -- the ``select_neurons`` pass (seed 003: group-lasso reconstruction of fc2's and
  fc3's outputs on calibration data, exact keep count, debiased) followed by ``collapse``;
* magnitude -- each consumer keeps the inputs whose weight columns have the largest L2 norm and its
  weights are left as they are (no reconstruction), then ``collapse``;
* torch-pruning -- ``torch_pruning.pruner.MagnitudePruner`` (L2 magnitude importance over each
  dependency group, fc1/fc2 rows with fc2/fc3 columns) at the same pruning ratio.

No fine-tuning anywhere.  Data: the MNIST test set (10k images) found under ``--root`` split 8k/2k
by ``fxcompress.data`` (``split: train`` trains and calibrates, ``split: test`` is reported).

    python benchmarks/selection_pareto.py --root /work/shared/data/mnist

Data loading, training and parameter counting are shared with ``lowrank_vs_selection.py`` in ``_mnist.py``.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch_pruning as tp

import fxcompress
from _mnist import collapsed, params, trained_lenet300
from fxcompress.selector import select_inputs
from fxcompress.training import accuracy

KEEP = (0.75, 0.5, 0.3, 0.2, 0.1, 0.05)


def reconstruction(model, keep: float, calibration):
    recipe = {"fxcompress": 1, "input_shape": [1, 784],
              "passes": [{"select_neurons": {"keep": keep}}, "collapse"]}
    return fxcompress.compress(copy.deepcopy(model), recipe, calibration=calibration, progress=False).model


def magnitude(model, keep: float):
    gm = fxcompress.trace(copy.deepcopy(model))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name in ("fc2", "fc3"):
        weight = gm.get_submodule(name).weight.detach()
        count = max(1, round(keep * weight.shape[1]))
        select_inputs(gm, nodes[name], torch.topk(weight.norm(dim=0), count).indices.sort().values)
    gm.recompile()
    return collapsed(gm)


def torch_pruning(model, keep: float):
    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(pruned, torch.randn(1, 784), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=1 - keep, ignored_layers=[pruned.fc3])
    pruner.step()
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/work/shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    trained = trained_lenet300(args.root, args.epochs)
    model, test, calibration = trained.model, trained.test, trained.calibration
    print(trained.describe() + "\n")
    print("| hidden neurons kept | fc1/fc2 neurons | params | reconstruction | magnitude | torch-pruning | "
          "selection time (s) |")
    print("|---|---|---|---|---|---|---|")
    for keep in KEEP:
        start = time.perf_counter()
        ours = reconstruction(model, keep, calibration)
        seconds = time.perf_counter() - start
        baseline, peer = magnitude(model, keep), torch_pruning(model, keep)
        assert params(ours) == params(baseline), "reconstruction and magnitude must keep the same neurons"
        peer_size = "" if params(peer) == params(ours) else \
            f" ({peer.fc1.out_features}/{peer.fc2.out_features}, {params(peer):,} params)"
        print(f"| {keep:.0%} | {ours.fc1.out_features}/{ours.fc2.out_features} | {params(ours):,} | "
              f"{accuracy(ours, test):.4f} | {accuracy(baseline, test):.4f} | {accuracy(peer, test):.4f}{peer_size} | "
              f"{seconds:.1f} |")


if __name__ == "__main__":
    main()
