"""fold_batchnorm: fold an eval-mode BatchNorm into the Conv/Linear that feeds it (exact)."""
from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from fxcompress import PassConfig, register_pass
from fxcompress.rewrite import finish, module_of, replace_module

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _fused(producer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, out_shape) -> nn.Module | None:
    if bn.running_mean is None or bn.running_var is None:
        return None
    if isinstance(producer, CONVS) and producer.out_channels == bn.num_features:
        return fuse_conv_bn_eval(producer.eval(), bn.eval(),
                                 transpose=isinstance(producer, nn.modules.conv._ConvTransposeNd))
    if isinstance(producer, nn.Linear) and producer.out_features == bn.num_features and \
            out_shape is not None and len(out_shape) == 2:
        return fuse_linear_bn_eval(producer.eval(), bn.eval())
    return None


@register_pass("fold_batchnorm", config=PassConfig, exact=True)
def fold_batchnorm(gm, ctx, config):
    """Fold every BatchNorm whose only input is a Conv/Linear read by nothing else into that layer."""
    shapes = ctx.analysis("shapes", gm)
    folded = []
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or len(node.args) != 1 or node.kwargs:
            continue
        producer_node = node.args[0]
        producer = module_of(gm, producer_node) if hasattr(producer_node, "op") else None
        if producer is None or len(producer_node.users) != 1:
            continue
        fused = _fused(producer, bn, shapes.get(producer_node.name))
        if fused is None:
            continue
        replace_module(gm, producer_node.target, fused)
        node.replace_all_uses_with(producer_node)
        gm.graph.erase_node(node)
        folded.append(node.target)
    ctx.note(f"folded {len(folded)} BatchNorm layer(s)" + (f": {', '.join(folded[:8])}" +
                                                            (" ..." if len(folded) > 8 else "") if folded else ""))
    return finish(gm)
