"""bench/racers.py: the pool of a race, the leave-one-seed-out selection and the split of
``survivor - reference`` (expected values worked out by hand from the definitions)."""

import pandas as pd
import pytest

LORA8 = '{"lora": [8, 8]}'


def _finalists(rows):
    return pd.DataFrame(rows, columns=["finalist", "source", "params", "config_json", "chosen"])


def test_pool_counts_a_config_raced_at_two_rates_once_and_adds_the_reference(load_bench):
    b = load_bench("racers")
    fin = _finalists([(0, "search", 100, '{"vpt": [1, 0]}', False),
                      (1, "search", 100, '{"vpt":[1,0]}', True),          # same config, another lr: the chosen one
                      (2, "baseline:lora", 90, '{"lora": [7, 7]}', False)])
    pool = b.pool_of("t", fin, LORA8, 120)
    assert [(r.index, r.source, r.chosen, r.reference) for r in pool] == \
        [(1, "search", True, False), (2, "baseline:lora", False, False), (3, "baseline:lora", False, True)]
    assert pool[-1].params == 120 and pool[-1].job == "t-racer3"


def test_pool_flags_the_reference_when_the_race_held_it(load_bench):
    b = load_bench("racers")
    fin = _finalists([(0, "search", 100, '{"vpt": [1, 0]}', True), (1, "baseline:lora", 120, LORA8, False)])
    pool = b.pool_of("t", fin, LORA8, 120)
    assert [(r.index, r.reference) for r in pool] == [(0, False), (1, True)]


def test_held_out_gain_picks_on_the_other_seeds_and_scores_the_left_out_one(load_bench):
    b = load_bench("racers")
    acc = {0: [90.0, 92.0, 94.0], 1: [91.0, 91.0, 91.0], 2: [95.0, 80.0, 96.0]}
    # seed 0 left out: means 93 / 91 / 88 -> racer 0, gain 0; seed 1: 92 / 91 / 95.5 -> racer 2,
    # 80 - 92 = -12; seed 2: 91 / 91 / 87.5 -> a tie, the lower index (0), gain 0
    assert b.held_out_gain(acc, 0) == pytest.approx(-4.0)
    with pytest.raises(ValueError, match="same"):
        b.held_out_gain({0: [1.0, 2.0], 1: [1.0]}, 0)


def test_ceiling_splits_the_survivors_gap_into_pool_and_selection(load_bench):
    b = load_bench("racers")
    racers = [b.Racer("t", 0, "baseline:lora", 120, LORA8, reference=True),
              b.Racer("t", 1, "search", 100, "{}"), b.Racer("t", 2, "search", 90, "{}", chosen=True),
              b.Racer("t", 3, "search", 110, "{}")]
    acc = {0: [90.0, 92.0, 94.0], 1: [91.0, 91.0, 91.0], 2: [95.0, 80.0, 96.0], 3: [94.0, 94.0, 94.0]}
    c = b.ceiling("t", racers, acc)
    assert (c.reference, c.best, c.best_racer) == (92.0, 94.0, 3)
    assert c.survivor == pytest.approx(271 / 3)
    assert c.pool == pytest.approx(2.0)                        # 94 - 92
    assert c.selection == pytest.approx(271 / 3 - 94.0)
    # left out 0: 93 / 91 / 88 / 94 -> 3: 94 - 90; 1: 92 / 91 / 95.5 / 94 -> 2: 80 - 92; 2: 91 / 91 / 87.5 / 94 -> 3: 0
    assert c.held_out == pytest.approx((4 - 12 + 0) / 3)
    assert (c.racers, c.above) == (4, 1)                       # only racer 3 reaches 92 + 1


def test_sources_keep_the_named_kinds_the_reference_and_the_survivor(load_bench):
    b = load_bench("racers")
    racers = [b.Racer("t", 0, "search", 100, "{}"), b.Racer("t", 1, "baseline:vpt", 110, "{}", chosen=True),
              b.Racer("t", 2, "baseline:adapter", 115, "{}"),
              b.Racer("t", 3, "baseline:lora", 120, LORA8, reference=True)]
    assert [r.index for r in b.of_sources(racers, ("search",))] == [0, 1, 3]
    assert [r.index for r in b.of_sources(racers, ("baseline",))] == [1, 2, 3]
    assert [r.index for r in b.of_sources(racers, ())] == [0, 1, 2, 3]
