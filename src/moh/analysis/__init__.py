"""Routing analysis: ``collect_routing`` (forward hooks on every MoHAttention) and
``write_pictures`` (head-load heatmaps per group, head usage, router entropy, heads active)."""
from moh.analysis.plots import write_pictures
from moh.analysis.routing import RoutingRecord, attention_layers, collect_routing

__all__ = ["collect_routing", "write_pictures", "RoutingRecord", "attention_layers"]
