"""The shape of one expert-parallel deployment, and the rules it must obey.

Every other module takes a :class:`Geometry` instead of loose integers, so a
shape that cannot work is rejected once, here, with the field and rule named.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Geometry", "GeometryError"]


class GeometryError(ValueError):
    """A geometry field breaks a rule; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"geometry.{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Geometry:
    """L layers of E logical experts on R ranks with S slots each, over N nodes.

    Ranks are numbered node-major: rank r lives on node ``r // (R // N)``.
    Physical slot p (0 <= p < P = R*S) lives on rank ``p // S``.
    ``num_groups`` (G) > 1 enables group-limited routing: experts
    ``[g*E/G, (g+1)*E/G)`` form group g.
    """

    num_layers: int
    num_experts: int
    num_ranks: int
    slots_per_rank: int
    num_nodes: int = 1
    num_groups: int = 1
    expert_bytes: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise GeometryError(f.name, f"must be an int, got {type(v).__name__} {v!r}")
            lo = 0 if f.name == "expert_bytes" else 1
            if v < lo:
                raise GeometryError(f.name, f"must be >= {lo}, got {v}")
        if self.num_ranks % self.num_nodes:
            raise GeometryError(
                "num_ranks",
                f"must be divisible by num_nodes ({self.num_ranks} ranks over {self.num_nodes} nodes)",
            )
        if self.num_slots < self.num_experts:
            raise GeometryError(
                "slots_per_rank",
                f"P = num_ranks * slots_per_rank = {self.num_slots} must be >= num_experts = "
                f"{self.num_experts} (every expert needs a slot)",
            )
        if self.slots_per_rank > self.num_experts:
            raise GeometryError(
                "slots_per_rank",
                f"must be <= num_experts ({self.slots_per_rank} > {self.num_experts}): a rank holds "
                "at most one replica of each expert",
            )
        if self.num_experts % self.num_groups:
            raise GeometryError(
                "num_groups",
                f"must divide num_experts ({self.num_experts} experts into {self.num_groups} groups)",
            )
        if self.num_slots > 2**31 - 1 or self.num_layers * self.num_slots > 2**31 - 1:
            raise GeometryError("num_layers", "num_layers * P must fit in int32")

    @property
    def num_slots(self) -> int:
        """P = R*S physical slots."""
        return self.num_ranks * self.slots_per_rank

    @property
    def num_redundant(self) -> int:
        """P - E redundant slots."""
        return self.num_slots - self.num_experts

    @property
    def ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def max_replicas(self) -> int:
        """Most replicas one expert can have: one per rank, and others keep one each."""
        return min(self.num_ranks, self.num_slots - self.num_experts + 1)

    def node_of_rank(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise GeometryError(unknown[0], "unknown geometry field")
        return cls(**d)

    @classmethod
    def deepseek_v3(cls, num_nodes: int = 4, expert_bytes: int = 3 * 7168 * 2048) -> Geometry:
        """58 MoE layers, 256 experts + 32 redundant on 32 ranks (9 slots each), 8 groups.

        ``expert_bytes`` defaults to three 7168x2048 FP8 matrices (gate, up, down).
        """
        return cls(58, 256, 32, 9, num_nodes=num_nodes, num_groups=8, expert_bytes=expert_bytes)
