"""Per-sequence adapters apply exactly where asked: in this thread, to the model's v whichever
module holds the layers is called, under torch.compile, for a batch of the assignment's size (or
generate's expansion of it), and never silently lost in transformers' continuous batching."""

import threading

import pytest
import torch

from tinylora_kernels import AdapterSet
from tinylora_kernels.adapter_set import BASE, MODEL

from test_adapter_set import _alone, _f64_close, _model, _vs

NAMES = ["a0", BASE, "a1", MODEL]


def _want(model, gp, vs, ids):
    """Each sequence run alone with its adapter (the plain way)."""
    rows = []
    for i, name in enumerate(NAMES):
        v = None if name == BASE else ("own" if name == MODEL else vs[name])
        rows.append(_alone(model, gp, v, ids[i:i + 1]))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def setup():
    model, gp = _model(False)
    model.eval()
    vs = _vs(2, 6, seed=4)
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(5))
    return model, gp, AdapterSet(model, vs), ids, _want(model, gp, vs, ids)


def test_a_submodule_given_or_called_gets_the_assignment(setup):
    model, gp, adapters, ids, want = setup
    with torch.no_grad():
        with adapters.per_sequence(model.model, NAMES):           # the inner module given
            got = model(ids).logits
        _f64_close(got, want)
        with adapters.per_sequence(model, NAMES):                 # the inner module called
            hidden = model.model(ids).last_hidden_state
        _f64_close(model.lm_head(hidden), want)


def test_another_thread_keeps_the_models_own_v(setup):
    model, gp, adapters, ids, want = setup
    with torch.no_grad():
        plain = model(ids).logits
    seen, inside, leave = {}, threading.Event(), threading.Event()

    def other():
        inside.wait(60)
        try:
            with torch.no_grad():
                seen["out"] = model(ids).logits
        except Exception as exc:                # noqa: BLE001 - reported below
            seen["error"] = exc
        leave.set()

    t = threading.Thread(target=other)
    t.start()
    with torch.no_grad(), adapters.per_sequence(model, NAMES):
        inside.set()
        leave.wait(60)
        got = model(ids).logits
    t.join(60)
    assert "error" not in seen, seen.get("error")
    assert torch.equal(seen["out"], plain)
    _f64_close(got, want)


def test_a_batch_of_another_size_is_an_error_outside_generate(setup):
    model, gp, adapters, ids, want = setup
    with adapters.per_sequence(model, ["a0", "a1"]), torch.no_grad():
        with pytest.raises(ValueError, match=r"names 2 sequences.*batch of 4"):
            model(ids)
        with pytest.raises(ValueError, match=r"names 2 sequences.*batch of 4"):
            model.model(ids)                    # no model call open: the layers check it
    with torch.no_grad():
        model(ids)                              # and the model works after


def test_compiled_model_honours_the_assignment(setup):
    model, gp, adapters, ids, want = setup
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        plain = compiled(ids).logits
        _f64_close(plain, model(ids).logits)
        with adapters.per_sequence(compiled, NAMES):
            got = compiled(ids).logits
        after = compiled(ids).logits
    _f64_close(got, want)
    assert torch.equal(after, plain)


def test_continuous_batching_is_refused_in_the_block(setup):
    model, gp, adapters, ids, want = setup
    with adapters.per_sequence(model, NAMES):
        for name in ("generate_batch", "init_continuous_batching"):
            with pytest.raises(ValueError, match="continuous batching"):
                getattr(model, name)(inputs=[[1, 2, 3]])
    assert "generate_batch" not in model.__dict__          # the originals are back
    assert model.generate_batch.__func__ is type(model).generate_batch
