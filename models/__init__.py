"""Model adapters. Importing this package registers every model family."""

from probe.models import blip, git, hf_vit, own_captioners, vit, vit_gpt2, xattn_cond

vit.register()
hf_vit.register()
own_captioners.register()
xattn_cond.register()
vit_gpt2.register()
blip.register()
git.register()
