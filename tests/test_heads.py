import pytest

from caploc import CaplocError, Head, HeadLayout

LAYOUT = HeadLayout(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64)


def test_parse_and_format_round_trip():
    assert Head.parse("L3H2") == Head(3, 2)
    assert str(Head(12, 8)) == "L12H8"
    assert Head.parse(" l5h1 ") == Head(5, 1)


@pytest.mark.parametrize("bad", ["3H2", "L3", "LxH1", "L3H", "", "L-1H2"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(CaplocError):
        Head.parse(bad)


def test_validate_names_valid_range():
    with pytest.raises(CaplocError, match=r"L0\.\.L29.*H0\.\.H8"):
        LAYOUT.validate(Head(99, 3))
    with pytest.raises(CaplocError):
        LAYOUT.index(Head(0, 9))


def test_index_round_trip_and_listing():
    heads = LAYOUT.all_heads()
    assert len(heads) == 270 == LAYOUT.n_total
    assert [LAYOUT.index(h) for h in heads] == list(range(270))
    assert all(LAYOUT.head(LAYOUT.index(h)) == h for h in heads)


def test_kv_groups_under_gqa():
    # 9 query heads share 3 KV heads: heads 0-2 -> group 0, 3-5 -> 1, 6-8 -> 2
    assert [LAYOUT.kv_group(Head(0, h)) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_parse_list_with_layer_shorthand_and_dedup():
    assert LAYOUT.parse_list("L3H2,L5H1,L3H2") == [Head(3, 2), Head(5, 1)]
    assert LAYOUT.parse_list("L0") == [Head(0, h) for h in range(9)]
    with pytest.raises(CaplocError):
        LAYOUT.parse_list("L30")
    with pytest.raises(CaplocError):
        LAYOUT.parse_list("L99H3")
