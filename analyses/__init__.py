"""Analyses; importing this package registers them."""
