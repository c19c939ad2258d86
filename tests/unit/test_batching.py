"""Batching: a symbolic batch axis for the bundled graphs, and concurrent calls gathered into one, on the CPU.

Every bundled graph is checked to give, for a batch of N, what it gives for the N items one at a time (so a GPU
worker may batch it); the batcher is checked with real ONNX Runtime sessions of bundled graphs, its limits by
counting the calls that reach the backend (never by timing), its wait with a clock the test moves.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

onnx = pytest.importorskip("onnx")  # the gpu and train extras; a serving install runs every graph unbatched
from onnx import TensorProto, helper

from models.inference.backend import Arrays, Backend, OnnxRuntimeBackend
from models.inference.backends import InferenceRuntime
from models.inference.batch_axis import BATCH_AXIS, input_shapes, with_symbolic_batch
from models.inference.batching import BATCH_TOLERANCE, BatchingBackend, batch_inconsistency
from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest

GRAPHS = sorted(BUNDLED_MODEL_DIR.glob("*.onnx"))
JOIN_S = 60.0  # a thread still running after this has hung: the test fails instead of waiting for ever


class Counting:
    """A real backend, with the leading dimension of every call that reached it recorded."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.rows: list[int] = []
        self._lock = threading.Lock()

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.backend.output_names

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        with self._lock:
            self.rows.append(int(next(iter(inputs.values())).shape[0]))
        return self.backend.run(inputs)


def _symbolic(name: str) -> bytes:
    return with_symbolic_batch((BUNDLED_MODEL_DIR / name).read_bytes())


def _items(
    count: int, shape: tuple[int, ...] = (1, 1, 96, 96), seed: int = 0
) -> list[dict[str, npt.NDArray[np.float32]]]:
    generator = np.random.default_rng(seed)
    return [{"image": generator.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _in_threads(calls: list[Callable[[], Arrays]]) -> list[Arrays | BaseException]:
    """Run every call on its own thread at once; each one's outputs or exception, in order."""
    results: list[Arrays | BaseException | None] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
        assert not thread.is_alive(), "a caller is still waiting"
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


def _clock(*values: float) -> Callable[[], float]:
    """A monotonic clock that reads ``values`` in turn, then stays at the last."""
    readings: Iterator[float] = itertools.chain(values, itertools.repeat(values[-1]))
    return lambda: next(readings)


# --- the batch axis -----------------------------------------------------------------------------


def test_every_bundled_graph_is_batched_in_memory_without_touching_its_file() -> None:
    for path in GRAPHS:
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        proto = onnx.load_model_from_string(with_symbolic_batch(path.read_bytes()))
        for value in (*proto.graph.input, *proto.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == BATCH_AXIS, (path.name, value.name)
        original = onnx.load(str(path))
        for got, was in zip(proto.graph.input, original.graph.input, strict=True):
            assert got.type.tensor_type.shape.dim[1:] == was.type.tensor_type.shape.dim[1:]  # only the batch changed
        assert len(proto.graph.node) == len(original.graph.node)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.stem)
def test_a_batch_gives_each_bundled_graph_what_its_items_give_alone(path: Path) -> None:
    batched = OnnxRuntimeBackend(with_symbolic_batch(path.read_bytes()))
    alone = OnnxRuntimeBackend(path)  # the committed file, as served today
    shapes = input_shapes(path.read_bytes())
    generator = np.random.default_rng(7)
    # Sizes the graph leaves open (the mammography finder's height and width) are given 64.
    items = [
        {
            n: generator.standard_normal((1, *(64 if d is None else d for d in s[1:]))).astype(np.float32)
            for n, s in shapes.items()
        }
        for _ in range(3)
    ]
    singles = [alone.run(item) for item in items]
    outputs = batched.run({name: np.concatenate([item[name] for item in items]) for name in shapes})
    for name in alone.output_names:
        expected = np.concatenate([single[name] for single in singles])
        assert outputs[name].shape == expected.shape
        scale = max(1.0, float(np.max(np.abs(expected))))
        np.testing.assert_allclose(outputs[name], expected, rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE * scale)
    assert batch_inconsistency(batched, shapes) is None


def _graph(nodes: Sequence[onnx.NodeProto], initializers: Sequence[onnx.TensorProto] = ()) -> bytes:
    graph = helper.make_graph(
        list(nodes),
        "trial",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def test_a_graph_that_fixes_its_batch_inside_is_refused_with_the_reason() -> None:
    # Reshape to the constant [1, 4]: renaming the input's batch axis cannot make it take two rows.
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    model = with_symbolic_batch(_graph([helper.make_node("Reshape", ["image", "shape"], ["out"])], [shape]))
    reason = batch_inconsistency(OnnxRuntimeBackend(model), input_shapes(model))
    assert reason is not None and "a batch of 2 failed" in reason


def test_a_graph_that_mixes_the_items_of_a_batch_is_refused_with_the_reason() -> None:
    # Subtracting the mean over the batch: alone an item gives zeros, in a batch it does not.
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["image", "mean"], ["out"]),
    ]
    model = with_symbolic_batch(_graph(nodes))
    reason = batch_inconsistency(OnnxRuntimeBackend(model), input_shapes(model))
    assert reason is not None and "differs from the items run alone" in reason


def test_an_unbatchable_graph_runs_one_call_per_item() -> None:
    backend = Counting(OnnxRuntimeBackend(BUNDLED_MODEL_DIR / "dl_u.onnx"))
    batcher = BatchingBackend(backend, max_batch=4, max_wait_s=3600.0, batchable=False)
    _in_threads([lambda item=item: batcher.run(item) for item in _items(4)])  # type: ignore[misc]
    assert backend.rows == [1, 1, 1, 1]


def test_the_runtime_batches_the_bundled_graphs_and_records_it() -> None:
    runtime = InferenceRuntime(max_batch=4, max_wait_ms=1.0)
    entry = read_manifest()["dl_u"]
    backend = runtime.open(entry)
    assert isinstance(backend, BatchingBackend) and backend.batchable
    assert runtime.placements()[entry.name].batching == "up to 4 rows"


# --- the batcher --------------------------------------------------------------------------------


def test_concurrent_callers_get_exactly_what_they_get_alone_in_batches_of_at_most_max_batch() -> None:
    alone = OnnxRuntimeBackend(BUNDLED_MODEL_DIR / "dl_u.onnx")
    backend = Counting(OnnxRuntimeBackend(_symbolic("dl_u.onnx")))
    # A wait far longer than the test: only a full batch of 3 lets a batch run, so 6 callers make exactly two.
    batcher = BatchingBackend(backend, max_batch=3, max_wait_s=3600.0)
    items = _items(6)
    results = _in_threads([lambda item=item: batcher.run(item) for item in items])  # type: ignore[misc]
    assert backend.rows == [3, 3]
    for item, result in zip(items, results, strict=True):
        assert not isinstance(result, BaseException)
        expected = alone.run(item)
        for name in alone.output_names:
            np.testing.assert_array_equal(result[name], expected[name])


def test_the_first_caller_waits_for_more_until_the_batch_is_full() -> None:
    backend = Counting(OnnxRuntimeBackend(_symbolic("dl_u.onnx")))
    batcher = BatchingBackend(backend, max_batch=2, max_wait_s=3600.0, clock=_clock(0.0))  # time never passes
    first, second = _items(2)
    results: list[Arrays] = []
    waiting = threading.Thread(target=lambda: results.append(batcher.run(first)), daemon=True)
    waiting.start()
    for _ in range(int(JOIN_S * 100)):
        if batcher.waiting == 1:
            break
        threading.Event().wait(0.01)
    assert batcher.waiting == 1 and backend.rows == []  # alone, it has not run
    results.append(batcher.run(second))
    waiting.join(JOIN_S)
    assert not waiting.is_alive()
    assert backend.rows == [2]


def test_a_caller_alone_runs_once_its_wait_is_over() -> None:
    backend = Counting(OnnxRuntimeBackend(_symbolic("dl_u.onnx")))
    # Arrives at 0 with a wait of 1 s; the clock then reads 1.5: the batch of one runs without more coming.
    batcher = BatchingBackend(backend, max_batch=8, max_wait_s=1.0, clock=_clock(0.0, 1.5))
    (result,) = _in_threads([lambda: batcher.run(_items(1)[0])])
    assert not isinstance(result, BaseException)
    assert backend.rows == [1]


def test_an_error_reaches_every_caller_of_the_batch() -> None:
    backend = Counting(OnnxRuntimeBackend(_symbolic("dl_u.onnx")))
    batcher = BatchingBackend(backend, max_batch=3, max_wait_s=3600.0)
    wrong = _items(3, shape=(1, 1, 90, 90))  # the graph takes 96 x 96
    results = _in_threads([lambda item=item: batcher.run(item) for item in wrong])  # type: ignore[misc]
    assert backend.rows == [3]
    assert all(isinstance(result, Exception) for result in results)
    assert len({type(result) for result in results}) == 1


def test_items_of_other_sizes_are_run_apart_and_each_gets_its_own() -> None:
    # The mammography finder takes any height and width: a batch cannot mix two sizes.
    alone = OnnxRuntimeBackend(BUNDLED_MODEL_DIR / "mg_finder.onnx")
    backend = Counting(OnnxRuntimeBackend(_symbolic("mg_finder.onnx")))
    batcher = BatchingBackend(backend, max_batch=2, max_wait_s=3600.0)
    small, large = _items(1, shape=(1, 1, 64, 64))[0], _items(1, shape=(1, 1, 96, 128), seed=1)[0]
    results = _in_threads([lambda: batcher.run(small), lambda: batcher.run(large)])
    assert sorted(backend.rows) == [1, 1]
    for item, result in zip((small, large), results, strict=True):
        assert not isinstance(result, BaseException)
        np.testing.assert_array_equal(result["logits"], alone.run(item)["logits"])


def test_a_call_larger_than_max_batch_runs_alone_as_given() -> None:
    backend = Counting(OnnxRuntimeBackend(_symbolic("dl_u.onnx")))
    batcher = BatchingBackend(backend, max_batch=2, max_wait_s=3600.0)
    many = {"image": np.concatenate([item["image"] for item in _items(3)])}
    assert batcher.run(many)["logit"].shape == (3, 1)
    assert backend.rows == [3]


def test_inputs_that_disagree_on_the_batch_are_refused() -> None:
    batcher = BatchingBackend(OnnxRuntimeBackend(_symbolic("dlr_bm.onnx")), max_batch=2, max_wait_s=0.0)
    with pytest.raises(ValueError, match="same leading"):
        batcher.run({"image": np.zeros((2, 1, 128, 128), np.float32), "clinical": np.zeros((1, 2), np.float32)})


def test_batcher_limits_are_checked() -> None:
    backend = OnnxRuntimeBackend(BUNDLED_MODEL_DIR / "dl_u.onnx")
    with pytest.raises(ValueError, match="max_batch"):
        BatchingBackend(backend, max_batch=0, max_wait_s=0.0)
    with pytest.raises(ValueError, match="max_wait_s"):
        BatchingBackend(backend, max_batch=2, max_wait_s=-1.0)
