"""Analyses; importing this package registers them."""

from probe.analyses import attention
from probe.registry import register_analysis

register_analysis(attention.NAME, attention, summary=attention.SUMMARY)
