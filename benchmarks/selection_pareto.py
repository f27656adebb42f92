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
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch_pruning as tp

import fxcompress
from fxcompress.data import load_source
from fxcompress.models import LeNet300
from fxcompress.recipe import DataSource
from fxcompress.selector import select_inputs
from fxcompress.training import accuracy, train

KEEP = (0.75, 0.5, 0.3, 0.2, 0.1, 0.05)


def mnist(root: str, split: str, batch_size: int, shuffle: bool = False):
    spec = DataSource(source="mnist", root=root, split=split, batch_size=batch_size, shuffle=shuffle)
    return load_source(spec, [1, 784])


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def collapsed(gm):
    recipe = {"fxcompress": 1, "input_shape": [1, 784], "passes": ["collapse"]}
    return fxcompress.compress(gm, recipe, progress=False).model


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
    torch.manual_seed(0)
    train_batches, test = mnist(args.root, "train", 64, shuffle=True), mnist(args.root, "test", 500)
    calibration = mnist(args.root, "train", 500)
    model = LeNet300(784)
    start = time.perf_counter()
    train(model, train_batches, epochs=args.epochs, lr=0.05, optimizer="sgd", shuffle=True, progress=False)
    model.eval()
    print(f"LeNet-300-100, {args.epochs} epochs on 8k MNIST images ({time.perf_counter() - start:.0f} s): "
          f"test accuracy {accuracy(model, test):.4f} on 2k images, {params(model):,} parameters\n")
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
