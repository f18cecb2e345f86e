import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseq as js
from jaxseq import masks


def _np_mask(lengths, t):
    """Independent reference: ``out[..., i] = i < lengths[...]`` (batch-major)."""
    lengths = np.asarray(lengths)
    out = np.zeros(lengths.shape + (t,), bool)
    for idx in np.ndindex(lengths.shape):
        for i in range(t):
            out[idx + (i,)] = i < lengths[idx]
    return out


def test_length_mask_known_answers():
    np.testing.assert_array_equal(
        masks.length_mask(jnp.array([0, 2, 3, 7, -1]), 3),
        np.array([[0, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]], bool),
    )
    np.testing.assert_array_equal(masks.length_mask(jnp.array(2), 4), [True, True, False, False])


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_both_layouts_agree_with_the_reference(shape):
    lengths = np.random.default_rng(0).integers(-1, 7, size=shape).astype(np.int32)
    want = _np_mask(lengths, 5)  # [*B, T]
    batch_major = masks.length_mask(jnp.asarray(lengths), 5)
    time_major = masks.lengths_to_mask(jnp.asarray(lengths), 5)
    assert batch_major.dtype == time_major.dtype == jnp.bool_
    assert batch_major.shape == shape + (5,) and time_major.shape == (5,) + shape
    np.testing.assert_array_equal(batch_major, want)
    np.testing.assert_array_equal(time_major, np.moveaxis(want, -1, 0))


def test_lengths_to_mask_known_answer_and_under_jit():
    want = np.array([[1, 1], [0, 1], [0, 1]], bool)
    np.testing.assert_array_equal(masks.lengths_to_mask(jnp.array([1, 3]), 3), want)
    got = jax.jit(masks.lengths_to_mask, static_argnums=1)(jnp.array([1, 3]), 3)
    np.testing.assert_array_equal(got, want)


def test_masks_under_x64_with_strict_promotion():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        lengths = jnp.array([1, 3], jnp.int64)
        np.testing.assert_array_equal(masks.length_mask(lengths, 2), [[1, 0], [1, 1]])
        np.testing.assert_array_equal(masks.lengths_to_mask(lengths, 2), [[1, 1], [0, 1]])


def test_length_mask_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"^lengths: expected an integer dtype, got float32\[2\]"):
        masks.length_mask(jnp.array([1.0, 2.0]), 3)
    with pytest.raises(TypeError, match=r"^lengths: expected an integer dtype"):
        masks.lengths_to_mask(jnp.array([1.0]), 3)
    with pytest.raises(ValueError, match=r"^max_length: expected a positive int, got 0"):
        masks.lengths_to_mask(jnp.array([1]), 0)


def test_causal_mask_known_answers():
    np.testing.assert_array_equal(
        js.causal_mask(3), np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)
    )
    np.testing.assert_array_equal(
        js.causal_mask(2, 4), np.array([[1, 0, 0, 0], [1, 1, 0, 0]], bool)
    )
    with pytest.raises(ValueError, match=r"^tk: expected a positive int"):
        js.causal_mask(2, 0)


def test_padding_and_combine_masks():
    pm = masks.padding_mask(jnp.array(1), jnp.array(2), 2, 3)
    np.testing.assert_array_equal(pm, np.array([[1, 1, 0], [0, 0, 0]], bool))
    pm2 = masks.padding_mask(None, jnp.array([1, 3]), 2, 3)
    np.testing.assert_array_equal(pm2, np.broadcast_to(_np_mask([1, 3], 3)[:, None], (2, 2, 3)))
    q, k = np.array([2, 0]), np.array([1, 3])
    want = _np_mask(q, 2)[:, :, None] & _np_mask(k, 3)[:, None, :]
    np.testing.assert_array_equal(masks.padding_mask(jnp.array(q), jnp.array(k), 2, 3), want)
    with pytest.raises(ValueError, match=r"^q_lengths: expected the batch shape of k_lengths"):
        masks.padding_mask(jnp.array([1, 2, 3]), jnp.array([1, 3]), 2, 3)
    both = masks.combine_masks(js.causal_mask(3), None, jnp.ones((3, 3), bool))
    np.testing.assert_array_equal(both, js.causal_mask(3))
    anded = masks.combine_masks(js.causal_mask(2), jnp.array([[False, True], [True, False]]))
    np.testing.assert_array_equal(anded, [[False, False], [True, False]])
    assert masks.combine_masks(None) is None
    with pytest.raises(ValueError, match=r"expected shape \[3, 3\], got bool\[3, 2\]"):
        masks.combine_masks(js.causal_mask(3), jnp.ones((3, 2), bool))
    with pytest.raises(TypeError, match=r"^masks\[1\]: expected dtype bool"):
        masks.combine_masks(js.causal_mask(2), jnp.ones((2, 2)))
