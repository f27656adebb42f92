"""Shipped recipes, installed as package data of `fxcompress.recipes`."""
