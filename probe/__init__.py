"""probe: interpretability and probing for vision transformers and vision-language captioners."""

__version__ = "0.1.0"
