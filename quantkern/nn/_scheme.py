"""The GPTQ-style scheme attributes (``bits``, ``group_size``, ``sym``, ``desc_act``) that quantized
modules holding a ``scheme`` (:class:`~quantkern.core.WeightScheme`) expose to formats and users."""

from __future__ import annotations


class SchemeAttributes:
    """Read-only views of ``self.scheme`` under the names GPTQ checkpoints and peers use."""

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def group_size(self) -> int:
        return self.scheme.group_size

    @property
    def sym(self) -> bool:
        return self.scheme.sym

    @property
    def desc_act(self) -> bool:
        return self.scheme.act_order
