"""addiff_core/wire.py: what travels between the ServerApp and the ClientApps."""
from __future__ import annotations


# ------------------------------------------------------------------------------------------
# wire-dtype float16 (issue #15.4): half the bytes, float32 again on arrival
# ------------------------------------------------------------------------------------------
def _stage(seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"vae.a.weight": rng.normal(0, 0.1, (8, 4, 3)).astype("float32"),
            "vae.a.bias": rng.normal(0, 0.1, 8).astype("float32"),
            "vae.step": np.array(3, dtype="int64"), "vae.scale": np.array(0.7, dtype="float32")}


def test_float16_wire_halves_the_bytes_and_decodes_to_float32_within_rounding():
    import numpy as np

    from addiff_core.wire import as_received, decode, encode, widen

    arrays = _stage()
    w32, layout = encode(arrays, ["vae"], separate={"vae.scale"})
    w16, layout16 = encode(arrays, ["vae"], separate={"vae.scale"}, wire_dtype="float16")
    assert layout16 == layout and set(w16) == set(w32)
    assert w16["packed:vae:float32"].dtype == np.float16 and w16["packed:vae:float32"].nbytes * 2 == w32["packed:vae:float32"].nbytes
    assert w16["packed:vae:int64"].dtype == np.int64 and w16["vae.scale"].dtype == np.float32  # only float32 params
    back = decode(w16, layout)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_allclose(back[k], v, rtol=1e-3, atol=1e-4)
    assert not np.array_equal(back["vae.a.weight"], arrays["vae.a.weight"])  # really rounded
    assert widen(w16)["packed:vae:float32"].dtype == np.float32
    received = as_received(arrays, ["vae"], {"vae.scale"}, "float16")
    assert all(np.array_equal(received[k], back[k]) for k in arrays)
    assert all(np.array_equal(as_received(arrays, ["vae"], {"vae.scale"})[k], arrays[k]) for k in arrays)


def test_float16_wire_keeps_float32_for_values_beyond_its_range():
    import numpy as np

    from addiff_core.wire import decode, encode

    arrays = {**_stage(), "vae.big": np.array([1e6, -2.0], dtype="float32")}
    wire, layout = encode(arrays, ["vae"], wire_dtype="float16")
    assert wire["packed:vae:float32"].dtype == np.float32
    assert np.array_equal(decode(wire, layout)["vae.big"], arrays["vae.big"])
