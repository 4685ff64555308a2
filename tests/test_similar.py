"""Near-duplicate groups: random-projection LSH against the exhaustive comparison."""

from __future__ import annotations

import numpy as np
import pytest

from tagd.search.similar import EmbeddingIndex, exhaustive_pairs, lsh_pairs, lsh_plan
from tagd.search.vectors import normalise


def planted(n: int, dim: int, sims: list[float], seed: int = 0) -> np.ndarray:
    """Unit vectors, with a partner at exactly each cosine in `sims` for the first rows."""
    rng = np.random.default_rng(seed)
    m = normalise(rng.standard_normal((n, dim)).astype(np.float32))
    for i, c in enumerate(sims):
        a = m[i]
        u = rng.standard_normal(dim).astype(np.float32)
        u -= (u @ a) * a
        u /= np.linalg.norm(u)
        m[n - 1 - i] = c * a + np.sqrt(1 - c * c) * u
    return m


@pytest.mark.parametrize("n", [1_000, 100_000, 5_000_000])
@pytest.mark.parametrize("min_sim", [0.9, 0.97, 0.995])
def test_plan_reaches_the_recall_at_the_threshold(n: int, min_sim: float) -> None:
    bits, bands = lsh_plan(n, min_sim, 0.99)
    p = 1 - np.arccos(min_sim) / np.pi
    assert 1 - (1 - p**bits) ** bands >= 0.99
    assert 1 - (1 - p**bits) ** (bands - 1) < 0.99 or bands == 1  # no wasted band
    assert 2**bits >= n / 4  # unrelated vectors rarely share a bucket


def test_lsh_finds_the_planted_pairs_and_nothing_below_the_threshold() -> None:
    sims = [0.9705, 0.972, 0.975, 0.98, 0.985, 0.99, 0.995, 0.999, 0.9999] * 3
    m = planted(6000, 128, sims)
    a, c, s = lsh_pairs(m, 0.97)
    assert np.all(s >= 0.97)
    assert np.allclose(s, np.einsum("ij,ij->i", m[a], m[c]), atol=1e-5)
    ea, ec, _ = exhaustive_pairs(m, 0.97)
    exact = set(zip(ea.tolist(), ec.tolist(), strict=True))
    found = set(zip(a.tolist(), c.tolist(), strict=True))
    assert found <= exact
    assert len(exact) == len(sims)
    assert len(exact - found) <= 1  # 99% per pair at 0.97, near-certain above


def test_groups_agree_with_exhaustive_including_a_crowded_bucket() -> None:
    rng = np.random.default_rng(5)
    m = planted(3000, 64, [0.99, 0.995, 0.999])
    base = m[10]
    crowd = normalise(base + 0.002 * rng.standard_normal((400, 64)).astype(np.float32))
    m = np.concatenate([m, crowd])
    index = EmbeddingIndex(1, "m", np.arange(100, 100 + len(m)), m)
    lsh = index.groups(0.98, exhaustive=False)
    full = index.groups(0.98, exhaustive=True)
    assert [sorted(f for f, _ in g) for g in lsh] == [sorted(f for f, _ in g) for g in full]
    assert len(lsh[0]) == 401  # the crowd and the row it was drawn around
    assert {len(g) for g in lsh[1:]} == {2}
    for g_lsh, g_full in zip(lsh, full, strict=True):
        assert dict(g_lsh) == pytest.approx(dict(g_full), abs=1e-5)


def test_the_sketch_test_drops_no_pair_the_buckets_find(monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates pass a sign-bit sketch before any row is read; at SKETCH_Z deviations no
    pair at the threshold is lost to it (the same pairs as with the test turned off), and it
    does turn most candidates away (they never reach the row gather)."""
    import tagd.search.similar as similar

    m = planted(20_000, 64, [0.9705] * 150 + [0.975, 0.99] * 25, seed=3)
    gathered: list[int] = []
    real = np.einsum

    def counting(spec, *ops):  # type: ignore[no-untyped-def]
        if spec == "ij,ij->i":
            gathered.append(len(ops[0]))
        return real(spec, *ops)

    monkeypatch.setattr(similar.np, "einsum", counting)
    a, c, _ = lsh_pairs(m, 0.97)
    checked = sum(gathered)
    monkeypatch.setattr(similar, "SKETCH_Z", 1e9)
    gathered.clear()
    a2, c2, _ = lsh_pairs(m, 0.97)
    assert set(zip(a.tolist(), c.tolist(), strict=True)) == set(
        zip(a2.tolist(), c2.tolist(), strict=True)
    )
    assert len(a) >= 0.97 * 200
    assert checked * 4 < sum(gathered)  # without the sketch, many more rows were read


def test_differing_bits_without_numpy_2() -> None:
    from tagd.search.similar import _POPCOUNT, _differing

    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**63, (50, 3), dtype=np.uint64)
    y = rng.integers(0, 2**63, (50, 3), dtype=np.uint64)
    want = [
        sum(bin(int(p) ^ int(q)).count("1") for p, q in zip(r, s, strict=True))
        for r, s in zip(x, y, strict=True)
    ]
    assert _differing(x, y).tolist() == want
    assert _POPCOUNT[(x ^ y).view(np.uint8)].sum(axis=1).tolist() == want
