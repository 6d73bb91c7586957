"""Token sampling: the filters, the decoding phases, and the distribution `sample_tokens` draws from.

Distribution. Each case draws 20k tokens from one row of fixed logits
(vectorised: the row broadcast over a batch axis, one key) and compares the
counts with the expected distribution by a chi-square test: softmax(logits /
temperature), renormalised over the top-k or the top-p nucleus. Seeds are
fixed, so the p-values are too; a wrong temperature or filter gives p-values
far below the 1e-3 threshold.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nbp import sampling

NUM_DRAWS = 20_000
# Distinct values (no ties at a top-k or top-p cut) and a mild range, so every
# kept token is expected more than 5 times at temperature 0.5 (chi-square's rule).
LOGITS = np.array([0.3, 1.0, -0.6, 0.7, -1.5, 0.0, 0.4, -1.0], np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max())
  return e / e.sum()


def _expected(temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
  """The closed form in float64: tempered softmax, cut to the top-k, then to the top-p nucleus."""
  probs = _softmax(LOGITS / temperature)
  order = np.argsort(-probs)
  keep = np.ones_like(probs, bool)
  if top_k:
    keep[order[top_k:]] = False
  if top_p < 1.0:
    # The nucleus of the (renormalised) top-k distribution: the smallest set of
    # most likely tokens whose mass reaches top_p.
    ranked = np.where(keep, probs, 0.0)[order]
    ranked /= ranked.sum()
    size = int(np.searchsorted(np.cumsum(ranked), top_p) + 1)
    keep[order[size:]] = False
  kept = np.where(keep, probs, 0.0)
  return kept / kept.sum()


def _counts(seed: int, **kwargs) -> np.ndarray:
  logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (NUM_DRAWS, LOGITS.size))
  # The logits are an argument, not a constant: XLA would fold the top-k sort of a constant at compile time.
  draws = np.asarray(jax.jit(lambda k, x: sampling.sample_tokens(k, x, **kwargs))(jax.random.key(seed), logits))
  assert draws.shape == (NUM_DRAWS,) and draws.dtype == np.int32
  return np.bincount(draws, minlength=LOGITS.size)


@pytest.mark.parametrize("seed,kwargs,support", [
    (1, dict(temperature=1.0), 8),
    (2, dict(temperature=0.5), 8),
    (3, dict(temperature=1.0, top_k=3), 3),
    (4, dict(temperature=1.0, top_p=0.7), 4),  # cumulative mass 0.28, 0.49, 0.64, 0.78: four tokens reach 0.7
    # The nucleus of the tempered distribution (cumulative 0.20, 0.37, 0.52, 0.66):
    # four tokens, where a nucleus taken before the temperature would keep three.
    (5, dict(temperature=2.0, top_p=0.6), 4),
    # Top-p within the renormalised top-5 (cumulative 0.32, 0.55, 0.73): three
    # tokens, where the unrenormalised masses would need four.
    (6, dict(temperature=1.0, top_k=5, top_p=0.7), 3),
], ids=["t1", "t0.5", "top_k3", "top_p0.7", "t2_top_p0.6", "top_k5_top_p0.7"])
def test_sampled_frequencies_match_the_distribution(seed, kwargs, support):
  want = _expected(**kwargs)
  assert np.count_nonzero(want) == support  # the case cuts where its comment says
  counts = _counts(seed, **kwargs)
  assert counts.sum() == NUM_DRAWS
  np.testing.assert_array_equal(counts[want == 0], 0)  # filtered tokens are never drawn
  kept = want > 0
  assert (NUM_DRAWS * want[kept]).min() > 5
  p_value = stats.chisquare(counts[kept], NUM_DRAWS * want[kept]).pvalue
  assert p_value > 1e-3, (kwargs, counts, np.round(NUM_DRAWS * want, 1), p_value)


# ---------------------------------------------------------------------------
# The filters and the decoding phases (from the former tests/test_ntp.py).


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = sampling.filter_logits(logits[:, None, :], top_k=2)[:, 0] > -1e29  # vectorised over a block axis
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = sampling.filter_logits(logits, top_p=0.75) > -1e29  # 0.5 + 0.3 covers 0.75
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = sampling.filter_logits(logits, top_p=0.5) > -1e29  # the first token alone reaches 0.5
  np.testing.assert_array_equal(kept, [[1, 0, 0, 0], [0, 0, 0, 1]])
  draws = jax.vmap(lambda k: sampling.sample_tokens(k, logits, top_k=1))(jax.random.split(jax.random.key(0), 20))
  assert (draws == jnp.array([0, 3])).all()


def _nucleus_float64(logits, top_p):
  """Bool [..., V]: the top-p nucleus computed in float64 (ties kept together)."""
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  greater = (x[..., None, :] > x[..., :, None])  # [..., V (token), V (others)]
  mass_above = (greater * p[..., None, :]).sum(-1)
  return (mass_above < top_p) | (x == x.max(-1, keepdims=True))


def test_top_p_by_binary_search_equals_the_sorted_nucleus():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3, 50)).astype(np.float32) * np.array([0.1, 1.0, 5.0])[:, None, None].repeat(2, 0)
  logits[0, 0, 10:20] = logits[0, 0, 5]  # ties straddling the nucleus' edge
  logits[1, 1, :] = 0.0  # all equal
  logits[2, 2, ::2] = -1e30  # masked by top-k before top-p
  logits[3, 0, 7] = -0.0
  logits = jnp.asarray(logits)
  for top_p in (0.0, 1e-6, 0.1, 0.5, 0.9, 0.99, 0.999):  # float32 masses cannot resolve a top_p nearer 1
    got = np.asarray(jax.jit(sampling.top_p_filter, static_argnums=1)(logits, top_p) > -1e29)
    np.testing.assert_array_equal(got, _nucleus_float64(logits, top_p), err_msg=f"top_p={top_p}")
    if top_p > 0:  # the sort-based reference (it drops every token at top_p 0)
      np.testing.assert_array_equal(got, sampling.top_p_filter_sorted(logits, top_p) > -1e29)
  np.testing.assert_array_equal(sampling.top_p_filter(logits, 0.9), sampling.filter_logits(logits, top_p=0.9))


def test_phase_bounds():
  assert sampling.phase_bounds(1, 48, 4) == [(1, 12), (12, 24), (24, 36), (36, 48)]
  assert sampling.phase_bounds(5, 8, 10) == [(5, 6), (6, 7), (7, 8)]  # never an empty phase
  assert sampling.phase_bounds(3, 3, 4) == [] and sampling.phase_bounds(0, 5, 1) == [(0, 5)]
  with pytest.raises(ValueError, match="cache_phases"):
    sampling.phase_bounds(0, 5, 0)


def test_consensus_keeps_the_candidate_agreeing_most_with_the_others():
  rng = np.random.default_rng(0)
  candidates = rng.integers(0, 3, size=(6, 5, 11))
  candidates[0, 1:] = candidates[0, 0]  # all alike: the first is kept
  got = np.asarray(sampling.consensus(jnp.asarray(candidates)))
  for row in range(6):
    agreement = (candidates[row, :, None] == candidates[row, None]).sum(axis=(1, 2))
    np.testing.assert_array_equal(got[row], candidates[row, np.argmax(agreement)])
  majority = np.array([[[0, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]])  # the two alike beat the others
  np.testing.assert_array_equal(sampling.consensus(jnp.asarray(majority)), [[1, 1, 1]])
  np.testing.assert_array_equal(sampling.consensus(jnp.asarray(candidates[:, :1])), candidates[:, 0])
