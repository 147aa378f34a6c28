import pytest

from eplbd.geometry import Geometry, GeometryError


def test_deepseek_shape():
    g = Geometry.deepseek_v3()
    assert (g.num_slots, g.num_redundant, g.ranks_per_node, g.experts_per_group) == (288, 32, 8, 32)
    assert g.max_replicas == 32
    assert g.node_of_rank(31) == 3 and g.rank_of_slot(287) == 31


def test_round_trip_dict():
    g = Geometry(4, 16, 4, 6, num_nodes=2, num_groups=4, expert_bytes=1024)
    assert Geometry.from_dict(g.to_dict()) == g


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (dict(num_layers=0), "num_layers", ">= 1"),
        (dict(num_experts=-1), "num_experts", ">= 1"),
        (dict(num_ranks=2.0), "num_ranks", "must be an int"),
        (dict(slots_per_rank=True), "slots_per_rank", "must be an int"),
        (dict(num_nodes=3), "num_ranks", "divisible by num_nodes"),
        (
            dict(slots_per_rank=3),
            "slots_per_rank",
            "P = num_ranks * slots_per_rank = 12 must be >= num_experts",
        ),
        (dict(num_experts=4, slots_per_rank=6), "slots_per_rank", "at most one replica"),
        (dict(num_groups=5), "num_groups", "must divide num_experts"),
        (dict(expert_bytes=-5), "expert_bytes", ">= 0"),
    ],
)
def test_each_rule_names_its_field(kwargs, field, words):
    base = dict(num_layers=4, num_experts=16, num_ranks=4, slots_per_rank=6, num_nodes=2)
    base.update(kwargs)
    with pytest.raises(GeometryError) as ei:
        Geometry(**base)
    assert ei.value.field == field
    assert f"geometry.{field}" in str(ei.value) and words in str(ei.value)


def test_unknown_field_from_dict():
    with pytest.raises(GeometryError, match="geometry.bogus: unknown geometry field"):
        Geometry.from_dict({"num_layers": 1, "bogus": 2})
