"""json_safe: the one strict-JSON helper (NaN/inf -> null, numpy -> Python)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import random_layer_stats
from moescope._json import json_safe
from moescope.stats.snapshot import LayerStats, Snapshot


def test_json_safe_is_strict_json_and_keeps_finite_values_exactly() -> None:
    obj = {
        "nan": math.nan, "inf": -math.inf, "x": 0.1, "i": 3, "b": True, "s": "t", "n": None,
        "np_f": np.float32(0.25), "np_nan": np.float64("nan"), "np_i": np.int64(7),
        "arr": np.array([[1.5, np.nan], [np.inf, 2.0]]), "ints": np.arange(3, dtype=np.int32),
        "tup": (1.0, math.nan), 5: [math.inf, {"deep": np.nan}],
    }  # fmt: skip
    out = json.loads(json.dumps(json_safe(obj), allow_nan=False))
    assert out == {
        "nan": None, "inf": None, "x": 0.1, "i": 3, "b": True, "s": "t", "n": None,
        "np_f": 0.25, "np_nan": None, "np_i": 7, "arr": [[1.5, None], [None, 2.0]],
        "ints": [0, 1, 2], "tup": [1.0, None], "5": [None, {"deep": None}],
    }  # fmt: skip
    assert type(json_safe(np.int64(7))) is int and type(json_safe(np.float32(0.5))) is float
    with pytest.raises(TypeError):  # what JSON cannot hold still fails loudly
        json.dumps(json_safe({"x": object()}))


def _layer(empty: bool) -> LayerStats:
    return random_layer_stats(0, 4, 2, t=16, mask="none" if empty else "all")


def test_snapshot_json_uses_it_and_round_trips() -> None:
    full, empty = _layer(False), _layer(True)  # a layer without tokens: NaN metrics
    assert math.isnan(empty.cv) and math.isfinite(full.cv)
    text = Snapshot(step=3, layers={"a": full, "b": empty}, time=math.nan).to_json()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert d["time"] is None and d["layers"]["b"]["cv"] is None
    assert d["layers"]["a"]["cv"] == full.cv
    assert d["layers"]["a"]["usage_counts"] == full.usage_counts.tolist()
    back = Snapshot.from_json(text).layers
    assert back["a"].cv == full.cv and math.isnan(back["b"].cv)
    assert np.array_equal(back["a"].usage_counts, full.usage_counts)
