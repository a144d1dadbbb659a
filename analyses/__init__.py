"""Analyses. Importing this package registers each one (`probe.registry.register_analysis`) and
each attribution method (`probe.analyses.explain.register_method`)."""

from probe.analyses import (
    ablation,
    attention,
    attention_flow,
    attribution,
    ca_params,
    efficiency,
    explain,
    faithfulness,
    flow,
    logit_lens,
    patching,
    probes,
    relevancy,
    representations,
    rollout,
)

__all__ = ["ablation", "attention", "attention_flow", "attribution", "ca_params", "efficiency", "explain", "faithfulness", "flow",
           "logit_lens", "patching", "probes", "relevancy", "representations", "rollout"]
