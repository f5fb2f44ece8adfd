"""client/protocol.py: the stage plan on the wire (one writer, one reader), and what a site makes of it."""
from __future__ import annotations

import pytest

from client.protocol import format_stage_plan, parse_stage_plan


def test_stage_plan_round_trip():
    for plan in ({"vae": 20, "diffusion": 4}, {"unet": 17}, {"vae": 1, "diffusion": 0}, {}):
        text = format_stage_plan(plan)
        assert parse_stage_plan(text) == plan
        assert list(parse_stage_plan(text)) == list(plan)  # run order kept
    assert format_stage_plan({"vae": 3, "diffusion": 4}) == "vae:3,diffusion:4"
    assert parse_stage_plan(" vae : 3 , diffusion:4 ") == {"vae": 3, "diffusion": 4}
    assert parse_stage_plan("") == {} and parse_stage_plan(None) == {}


@pytest.mark.parametrize("text", ["vae", "vae:x", ":3", "vae:-1", "vae:3;diffusion:4"])
def test_stage_plan_rejects_garbage(text):
    with pytest.raises(ValueError, match="stage plan"):
        parse_stage_plan(text)


@pytest.mark.parametrize("plan", [{"va:e": 1}, {"": 1}, {"vae": -1}, {"vae": 1.5}])
def test_stage_plan_cannot_write_what_it_cannot_read(plan):
    with pytest.raises(ValueError, match="stage plan"):
        format_stage_plan(plan)


def test_a_site_plans_its_epochs_from_the_stage_plan():
    from types import SimpleNamespace

    from client.site_models import run_epochs

    def planned_epochs(task, plan, local_epochs=0):
        return sum(run_epochs(task, {"stage-plan": plan, "local-epochs": local_epochs}).values())

    task = SimpleNamespace(site=SimpleNamespace(training=SimpleNamespace(vae_epochs=2, diffusion_epochs=5)))
    assert planned_epochs(task, format_stage_plan({"vae": 3, "diffusion": 4})) == 3 * 2 + 4 * 5
    assert planned_epochs(task, "vae:3,diffusion:4", local_epochs=1) == 7
    assert planned_epochs(task, "") == 0


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

    from client.protocol import as_received, decode, encode, widen

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

    from client.protocol import decode, encode

    arrays = {**_stage(), "vae.big": np.array([1e6, -2.0], dtype="float32")}
    wire, layout = encode(arrays, ["vae"], wire_dtype="float16")
    assert wire["packed:vae:float32"].dtype == np.float32
    assert np.array_equal(decode(wire, layout)["vae.big"], arrays["vae.big"])
