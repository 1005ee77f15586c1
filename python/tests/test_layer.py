"""moegen.Layer: specs as a path, as YAML text and as a dict; describe(); spec errors."""

from __future__ import annotations

import os
import re

import pytest
import yaml

moegen = pytest.importorskip("moegen")

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "specs")
SPEC_PATH = os.path.join(SPECS_DIR, "test-fp32.yaml")

SMALL = """\
# a small layer
name: layer-test
semantics: megatron
num_experts: 4
num_experts_per_tok: 2
hidden_size: 32
moe_intermediate_size: 16
activation: geglu
dtype: bf16
router:
  score_function: softmax
  order: softmax_then_topk
"""

DESC_KEYS = {"num_experts", "top_k", "hidden_size", "ffn_size", "dtype", "device", "variant",
             "spec_hash"}


def check_desc(desc, spec):
    assert isinstance(desc, dict)
    missing = DESC_KEYS - set(desc)
    assert not missing, f"describe() lacks {missing}"
    assert desc["num_experts"] == spec["num_experts"]
    assert desc["top_k"] == spec["num_experts_per_tok"]
    assert desc["hidden_size"] == spec["hidden_size"]
    assert desc["ffn_size"] == spec["moe_intermediate_size"]
    assert desc["dtype"] == spec.get("dtype", "bf16")
    assert desc["device"] in ("cpu", "CPU") or "cpu" in str(desc["device"]).lower()
    assert isinstance(desc["variant"], str) and desc["variant"]
    assert isinstance(desc["spec_hash"], str) and re.fullmatch(r"[0-9a-f]{64}", desc["spec_hash"])


@pytest.fixture(scope="module")
def by_path():
    layer = moegen.Layer(SPEC_PATH)
    return layer, layer.describe()


def test_layer_from_path(by_path):
    _, desc = by_path
    with open(SPEC_PATH) as f:
        spec = yaml.safe_load(f)
    check_desc(desc, spec)
    assert desc["dtype"] == "fp32" and desc["top_k"] == 1


def test_layer_from_text_and_dict_same_hash(by_path):
    _, desc = by_path
    with open(SPEC_PATH) as f:
        text = f.read()
    d_text = moegen.Layer(text).describe()
    d_dict = moegen.Layer(yaml.safe_load(text)).describe()
    assert d_text["spec_hash"] == desc["spec_hash"]
    assert d_dict["spec_hash"] == desc["spec_hash"]
    assert d_text["variant"] == desc["variant"] == d_dict["variant"]


def test_layer_small_text_dict_and_file(tmp_path):
    spec = yaml.safe_load(SMALL)
    d1 = moegen.Layer(SMALL).describe()
    check_desc(d1, spec)
    # key order, comments and defaults written out do not change the layer
    reordered = dict(reversed(list(spec.items())))
    reordered["router"] = dict(reversed(list(spec["router"].items())))
    reordered["expert_bias"] = False
    d2 = moegen.Layer(reordered).describe()
    assert d2["spec_hash"] == d1["spec_hash"]
    p = tmp_path / "small.yaml"
    p.write_text(SMALL)
    assert moegen.Layer(str(p)).describe()["spec_hash"] == d1["spec_hash"]
    # another layer, another hash
    other = dict(spec, num_experts_per_tok=1)
    assert moegen.Layer(other).describe()["spec_hash"] != d1["spec_hash"]


def _bad(spec):
    with pytest.raises(moegen.Error) as ei:
        moegen.Layer(spec)
    e = ei.value
    msg = str(e)
    assert hasattr(e, "status") and e.status is not None
    assert re.search(r":\d+:\d+: ", msg), f"no line:col in {msg!r}"
    return e, msg


def test_bad_spec_text_line_col():
    bad = SMALL.replace("hidden_size: 32", "hidden_size: 100")
    _, msg = _bad(bad)
    # hidden_size is on line 6, its value at column 14
    assert ":6:14:" in msg and "hidden_size" in msg, msg


def test_bad_spec_file_names_path(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(SMALL.replace("num_experts_per_tok: 2", "num_experts_per_tok: 9"))
    _, msg = _bad(str(p))
    assert f"{p}:5:" in msg and "num_experts_per_tok" in msg, msg


def test_bad_spec_unknown_key():
    _, msg = _bad(SMALL + "activaton: relu\n")
    assert "did you mean" in msg and "activation" in msg, msg


def test_bad_spec_dict():
    spec = yaml.safe_load(SMALL)
    spec["router"]["score_function"] = "Softmax"
    _, msg = _bad(spec)
    assert "score_function" in msg or "softmax" in msg, msg


def test_bad_spec_several_errors():
    bad = SMALL.replace("hidden_size: 32", "hidden_size: 100").replace("activation: geglu",
                                                                      "activaton: geglu")
    _, msg = _bad(bad)
    lines = [l for l in msg.splitlines() if re.search(r":\d+:\d+: ", l)]
    assert len(lines) >= 2, msg


def test_missing_file(tmp_path):
    path = str(tmp_path / "does-not-exist.yaml")
    # an unreadable file: moegen.Error (MOEGEN_ERR_IO) or Python's own OSError, naming the path
    with pytest.raises((moegen.Error, OSError)) as ei:
        moegen.Layer(path)
    assert "does-not-exist.yaml" in str(ei.value)
