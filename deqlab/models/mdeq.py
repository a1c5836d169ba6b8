"""Multiscale (MDEQ-style) paper models. Filled in below."""
