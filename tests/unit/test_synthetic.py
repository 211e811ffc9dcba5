"""The synthetic workloads (cluster/sim/synthetic.py): seeded, at their rate, sharing what they say."""

import pytest

from cluster.sim.synthetic import SYNTHETIC


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_seeded_sorted_and_near_the_rate(name):
    a, b = SYNTHETIC[name](2.0, 600, seed=3), SYNTHETIC[name](2.0, 600, seed=3)
    assert [(r.arrival_s, r.prompt_tokens) for r in a.requests] == [(r.arrival_s, r.prompt_tokens) for r in b.requests]
    times = [r.arrival_s for r in a.requests]
    assert len(times) == 600 and times == sorted(times)
    if name in ("shared_prefix", "long_prompt_short_output"):  # the others' rate moves: bursts, a ramp
        assert 1.5 < a.summary()["rate_rps"] < 2.5


def test_tenants_share_their_system_prompt_blocks():
    w = SYNTHETIC["shared_prefix"](4.0, 400, seed=1)
    by_tenant = {}
    for r in w.requests:
        by_tenant.setdefault(r.chain_ids[0], []).append(r)
    tenant = max(by_tenant.values(), key=len)
    first, second = tenant[0].block_hashes(), tenant[1].block_hashes()
    shared = len(tenant[0].chain_ids) * 32
    assert first[:shared] == second[:shared] and first[shared] != second[shared]
    other = next(v for v in by_tenant.values() if v is not tenant)[0].block_hashes()
    assert other[0] != first[0]


@pytest.mark.parametrize("name", ["multiscale_bursts", "long_prompt_bursts"])
def test_bursts_can_start_in_their_off_half(name):
    # the first 7.5 min (half the longest wave) are a burst by default, quiet with off_first: the next half is the burst
    on, off = SYNTHETIC[name](2.0, 3000, seed=3), SYNTHETIC[name](2.0, 3000, seed=3, off_first=True)

    def first_half(w):
        return sum(1 for r in w.requests if r.arrival_s < 450)

    assert first_half(off) * 3 < first_half(on)
    assert sum(1 for r in off.requests if 450 <= r.arrival_s < 900) > 3 * first_half(off)
