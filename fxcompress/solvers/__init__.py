"""Numerical kernels on tensors only: no torch.fx, no nn.Module."""
