"""Property: whatever keys of a torchvision state_dict are removed, renamed or reshaped, the
converter's error lists exactly those keys (in its attributes and in its message) and no other.

The state_dict is the real thing, `convert.to_torchvision` of resnet18 variables (10 classes),
built once; each example mutates a shallow copy and only validation runs, so 50 examples take
about a second.
"""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_jax import convert, models

ARCH, CLASSES = "resnet18", 10
COUNTER = "num_batches_tracked"  # torch's BatchNorm counters: dropped, never checked


@pytest.fixture(scope="module")
def state_dict() -> dict:
    """torchvision-layout tensors of a resnet18 with random values (no compile: from shapes)."""
    shapes = models.variable_shapes(models.get_model(ARCH, num_classes=CLASSES))
    rng = np.random.default_rng(0)
    variables = {
        collection: _map_leaves(lambda s: rng.standard_normal(s.shape, np.float32), tree)
        for collection, tree in shapes.items()
    }
    return dict(convert.to_torchvision(variables, ARCH))


def _map_leaves(fn, tree):
    return {k: _map_leaves(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _checked_keys(state_dict: dict) -> list[str]:
    return [k for k in state_dict if not k.endswith(COUNTER)]


# One list of distinct keys, each with what happens to it; names for renamed keys that are not
# torchvision keys of resnet18 (nor counters, which the converter ignores by design).
KINDS = ("remove", "rename", "reshape")
RESHAPES = ("append_axis", "grow_first", "drop_last")
NEW_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z0-9_]{1,8}){0,3}", fullmatch=True)


@st.composite
def mutations(draw, keys: list[str]) -> dict:
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=10))
    plan = {"remove": [], "rename": {}, "reshape": {}}
    taken = set(keys)
    for key in chosen:
        kind = draw(st.sampled_from(KINDS))
        if kind == "remove":
            plan["remove"].append(key)
        elif kind == "rename":
            new = draw(NEW_NAME.filter(lambda n: n not in taken and not n.endswith(COUNTER)))
            taken.add(new)
            plan["rename"][key] = new
        else:
            plan["reshape"][key] = draw(st.sampled_from(RESHAPES))
    return plan


def _reshaped(value, how: str, grow: int = 1):
    shape = tuple(value.shape)
    if how == "append_axis":
        shape = (*shape, 1)
    elif how == "grow_first":
        shape = (shape[0] + grow, *shape[1:])
    else:  # drop_last, or the only axis when there is one
        shape = shape[:-1] if len(shape) > 1 else (shape[0] + grow + 1,)
    return np.zeros(shape, np.float32)


def _apply(state_dict: dict, plan: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key in plan["remove"]:
            continue
        if key in plan["reshape"]:
            value = _reshaped(value, plan["reshape"][key])
        out[plan["rename"].get(key, key)] = value
    return out


def _parse(message: str) -> tuple[set, set, dict]:
    """(missing, unexpected, {key: (expected, found)}) from the listing message; every line
    after the header must be one of those three kinds."""
    header, *lines = message.splitlines()
    assert header == f"the given state_dict does not match {ARCH} (num_classes={CLASSES}):"
    missing, unexpected, shapes = set(), set(), {}
    for line in lines:
        if m := re.fullmatch(r"  (missing|unexpected) (\d+) keys: (.+)", line):
            names = m[3].split(", ")
            assert int(m[2]) == len(names) == len(set(names)), line
            (missing if m[1] == "missing" else unexpected).update(names)
        elif m := re.fullmatch(r"  wrong shape for (\S+): expected (\(.*\)), found (\(.*\))", line):
            assert m[1] not in shapes, line
            shapes[m[1]] = (m[2], m[3])
        else:
            pytest.fail(f"unexpected line in the message: {line!r}")
    return missing, unexpected, shapes


def _fmt(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_error_lists_exactly_the_removed_renamed_and_reshaped_keys(state_dict, data):
    plan = data.draw(mutations(_checked_keys(state_dict)))
    mutated = _apply(state_dict, plan)
    want_missing = set(plan["remove"]) | set(plan["rename"])
    want_unexpected = set(plan["rename"].values())
    want_mismatched = set(plan["reshape"])
    if not (want_missing or want_unexpected or want_mismatched):
        variables = convert.from_torchvision(mutated, ARCH, num_classes=CLASSES)
        assert variables["params"]["fc"]["kernel"].shape == (512, CLASSES)
        return

    with pytest.raises(convert.WeightsMismatchError) as err:
        convert.from_torchvision(mutated, ARCH, num_classes=CLASSES)
    error = err.value
    assert set(error.missing) == want_missing and len(error.missing) == len(want_missing)
    assert set(error.unexpected) == want_unexpected
    assert len(error.unexpected) == len(want_unexpected)
    assert set(error.mismatched) == want_mismatched
    assert len(error.mismatched) == len(want_mismatched)

    if convert.detect_arch(mutated) == ARCH:
        # Only the head changed, consistently (e.g. it was removed): said in one sentence.
        assert want_missing <= {"fc.weight", "fc.bias"} and not want_unexpected
        assert str(error).startswith("the given state_dict has ") and "\n" not in str(error)
        return
    missing, unexpected, shapes = _parse(str(error))
    assert (missing, unexpected) == (want_missing, want_unexpected)
    assert shapes == {
        k: (_fmt(state_dict[k].shape), _fmt(mutated[k].shape)) for k in want_mismatched
    }
