"""Analyses. Importing this package registers each one (`probe.registry.register_analysis`)."""

from probe.analyses import ablation, attention, ca_params, flow, rollout

__all__ = ["ablation", "attention", "ca_params", "flow", "rollout"]
