"""Analyses; importing this package registers them."""

from probe.analyses import attention, flow
from probe.registry import register_analysis

register_analysis(attention.NAME, attention, summary=attention.SUMMARY)
register_analysis(flow.NAME, flow, summary=flow.SUMMARY)
