"""Analyses. Importing this package registers each one (`probe.registry.register_analysis`)."""

from probe.analyses import ablation, attention, ca_params, flow

__all__ = ["ablation", "attention", "ca_params", "flow"]
