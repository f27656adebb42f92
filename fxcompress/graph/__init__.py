"""Analyses over a GraphModule: pure functions, cached by the pass context."""
