"""Model adapters. Importing this package registers every model family."""

from probe.models import hf_vit, own_captioners, vit, xattn_cond

vit.register()
hf_vit.register()
own_captioners.register()
xattn_cond.register()
