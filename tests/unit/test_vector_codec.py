"""The worker's binary encoders for pgvector's types write what pgvector's own write."""

from __future__ import annotations

import numpy as np
import pytest
from pgvector import HalfVector, Vector

from worker.store import _VECTOR_CODECS

ENCODERS = {name: encode for name, encode, _ in _VECTOR_CODECS}
rng = np.random.default_rng(3)


@pytest.mark.parametrize(
    "value",
    [
        rng.standard_normal(384).astype(np.float32),
        rng.standard_normal(7),  # float64: converted, as pgvector converts it
        rng.standard_normal(12).astype(np.float32)[::2],  # a strided view
        np.zeros(0, dtype=np.float32),
        [0.5, -1.25, 3.0],
        Vector([1.0, 2.0]),
    ],
    ids=["float32", "float64", "strided", "empty", "list", "pgvector"],
)
def test_vector_bytes_are_pgvectors(value: object) -> None:
    expected = (value if isinstance(value, Vector) else Vector(value)).to_binary()
    assert ENCODERS["vector"](value) == expected


@pytest.mark.parametrize(
    "value",
    [rng.standard_normal(384).astype(np.float32), [0.5, -1.25, 3.0], HalfVector([1.0, 2.0])],
    ids=["float32", "list", "pgvector"],
)
def test_halfvec_bytes_are_pgvectors(value: object) -> None:
    expected = (value if isinstance(value, HalfVector) else HalfVector(value)).to_binary()
    assert ENCODERS["halfvec"](value) == expected


def test_a_two_dimensional_array_is_refused_as_pgvector_refuses_it() -> None:
    with pytest.raises(ValueError, match="ndim"):
        ENCODERS["vector"](np.zeros((2, 3), dtype=np.float32))
