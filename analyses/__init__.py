"""Analyses; importing this package registers them."""

from probe.analyses import ablation, attention, ca_params, flow
from probe.registry import register_analysis

register_analysis(attention.NAME, attention, summary=attention.SUMMARY)
register_analysis(flow.NAME, flow, summary=flow.SUMMARY)
register_analysis(ca_params.NAME, ca_params, summary=ca_params.SUMMARY)
register_analysis(ablation.NAME, ablation, summary=ablation.SUMMARY)
