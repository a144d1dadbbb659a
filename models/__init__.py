"""Model adapters. Importing this package registers every model family."""

from probe.models import hf_vit, vit

vit.register()
hf_vit.register()
