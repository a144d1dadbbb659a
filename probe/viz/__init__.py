"""Rendering helpers: pure functions to `matplotlib.figure.Figure`, never pyplot (so importing
probe never changes a user's plotting backend)."""
