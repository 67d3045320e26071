"""Method schedules and configs: which blocks each method picks, and what it rejects."""

from __future__ import annotations

import pytest
from conftest import tiny_bert

from layerwise.anatomy import find_anatomy
from layerwise.errors import ConfigError
from layerwise.methods import METHODS, create_method, method_config


@pytest.fixture(scope="module")
def anatomy():
    return find_anatomy(tiny_bert(layers=4))


def make(anatomy, **cfg):
    return create_method(method_config(cfg), anatomy, task="classification", seed=3)


def test_registry_names():
    assert {"full", "freeze", "lift", "lisa", "lora"} <= set(METHODS)


def test_lift_bottom_up_and_top_down(anatomy):
    up = make(anatomy, name="lift", switch_every=2, schedule="bottom_up")
    assert [up.plan(s).blocks for s in range(0, 10, 2)] == [(0,), (1,), (2,), (3,), (0,)]
    assert up.plan(1).blocks == (0,) and up.plan(0).head and not up.plan(0).embeddings
    down = make(anatomy, name="lift", switch_every=1, schedule="top_down")
    assert [down.plan(s).blocks for s in range(4)] == [(3,), (2,), (1,), (0,)]


def test_lift_fits_its_schedule_to_the_run_and_says_what_it_reaches(anatomy, capsys):
    def blocks_trained(method, steps):
        return {b for s in range(steps) for b in method.plan(s).blocks}

    fitted = create_method(method_config({"name": "lift"}), anatomy, task="classification", max_steps=9)
    fitted.prepare(None)
    assert fitted.switch_every == 2 and blocks_trained(fitted, 9) == {0, 1, 2, 3}  # one whole pass, then block 3 again
    assert "4 phases of 2 steps (top_down: block 3 -> block 2 -> block 1 -> block 0), 1.12 passes in 9 steps" in capsys.readouterr().out
    fixed = create_method(method_config({"name": "lift", "switch_every": 4}), anatomy, task="classification", max_steps=9)
    fixed.prepare(None)
    assert blocks_trained(fixed, 9) == {3, 2, 1}
    assert "reach 3 of the 4 phases, so block 0 is never trained: raise train.max_steps to 16" in capsys.readouterr().out


def test_lift_k_and_phase_policies(anatomy):
    m = make(anatomy, name="lift", k=3, switch_every=1, embeddings="phase", head="phase", schedule="bottom_up")
    plans = [m.plan(s) for s in range(4)]
    assert plans[0].embeddings and not plans[0].blocks and not plans[0].head
    assert plans[1].blocks == (0, 1, 2) and plans[2].blocks == (3,)
    assert plans[3].head and not plans[3].blocks
    never = make(anatomy, name="lift", head="never", switch_every=1)
    assert not never.plan(0).head


def test_lift_random_covers_every_block_each_cycle_and_is_seeded(anatomy):
    m = make(anatomy, name="lift", schedule="random", switch_every=1)
    for cycle in range(3):
        assert sorted(m.plan(cycle * 4 + i).blocks[0] for i in range(4)) == [0, 1, 2, 3]
    again = make(anatomy, name="lift", schedule="random", switch_every=1)
    assert [m.plan(s) for s in range(12)] == [again.plan(s) for s in range(12)]
    orders = {tuple(m.plan(c * 4 + i).blocks[0] for i in range(4)) for c in range(6)}
    assert len(orders) > 1  # really random across cycles


def test_lisa_picks_k_blocks_and_keeps_embeddings_and_head(anatomy):
    m = make(anatomy, name="lisa", k=2, switch_every=5)
    p = m.plan(0)
    assert len(p.blocks) == 2 and p.embeddings and p.head
    assert m.plan(4) == p
    assert len({m.plan(5 * i).blocks for i in range(10)}) > 1
    # The same blocks, with the embeddings (and head) left out: backward then stops at the lowest chosen block.
    lean = make(anatomy, name="lisa", k=2, switch_every=5, embeddings="never", head="never")
    assert [lean.plan(s).blocks for s in range(0, 50, 5)] == [m.plan(s).blocks for s in range(0, 50, 5)]
    assert not lean.plan(0).embeddings and not lean.plan(0).head and lean.plan(0).lowest == min(p.blocks)


def test_freeze_variants(anatomy):
    assert make(anatomy, name="freeze", top=2).plan(0).blocks == (2, 3)
    assert make(anatomy, name="freeze", bottom=1).plan(0).blocks == (0,)
    assert make(anatomy, name="freeze", layers=[3, 1]).plan(0).blocks == (1, 3)


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"name": "freeze", "layers": [7]}, "block 7 does not exist"),
        ({"name": "freeze", "layers": [-1]}, "blocks 0..3"),
        ({"name": "freeze", "top": 9}, "exceeds"),
        ({"name": "freeze"}, "exactly one of"),
        ({"name": "lift", "k": 0}, "at least 1"),
        ({"name": "lift", "schedule": "sideways"}, "bottom_up"),
        ({"name": "lift", "stride": 2}, "unknown config key 'method.stride'"),
        ({"name": "nope"}, "unknown method 'nope'"),
        ({"name": "lisa", "k": 5}, "exceeds"),
    ],
)
def test_bad_method_configs_name_the_problem(anatomy, cfg, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("'", ".")):
        make(anatomy, **cfg)
