"""Architecture knowledge (MoE experts layouts for now; see :mod:`.moe`)."""

from .moe import EXPERTS_LAYOUTS, ExpertsLayout, experts_layout, is_router_name

__all__ = ["EXPERTS_LAYOUTS", "ExpertsLayout", "experts_layout", "is_router_name"]
