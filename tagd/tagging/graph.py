"""ONNX graph surgery done at load time: expose the pooled embedding, read the head, free the batch.

Stock tagger exports end in `pooled → MatMul/Gemm (+Add) [→ Sigmoid] → output`. Making the
pooled tensor a second graph output gives an embedding from any such model without a special
export, and the head's W, b let `reindex` recompute every score from a stored embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from tagd.tagging.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


class GraphError(Exception):
    """The graph does not have the shape this surgery needs; the message says what was found."""


@dataclass(frozen=True)
class Head:
    """logits = embedding @ weights + bias; probabilities = sigmoid(logits)."""

    embedding: str
    weights: np.ndarray
    bias: np.ndarray
    sigmoid_in_graph: bool

    @property
    def dim(self) -> int:
        return int(self.weights.shape[0])

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = embeddings.astype(np.float32) @ self.weights + self.bias
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_head(model: onnx.ModelProto, output: str | None = None) -> Head:
    """Walk back from the (first) graph output: [Sigmoid] ← [Add bias] ← MatMul/Gemm."""
    graph = model.graph
    if not graph.output:
        raise GraphError("the graph has no outputs")
    output = output or graph.output[0].name
    producer = {o: n for n in graph.node for o in n.output}
    consts = _constants(model)
    node = producer.get(output)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    sigmoid = node is not None and node.op_type == "Sigmoid"
    if sigmoid:
        assert node is not None
        node = producer.get(node.input[0])
    bias: np.ndarray | None = None
    if node is not None and node.op_type == "Add":
        a, b = node.input[0], node.input[1]
        const, other = (b, a) if b in consts else (a, b) if a in consts else (None, None)
        if const is None or other is None:
            raise GraphError(f"the Add before {output!r} has no constant bias")
        bias = consts[const].astype(np.float32).reshape(-1)
        node = producer.get(other)
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        found = "a graph input" if node is None else f"a {node.op_type} node"
        raise GraphError(
            f"{output!r} is not produced by a MatMul/Gemm head (walking back found {found})"
        )
    a, b = node.input[0], node.input[1]
    if b not in consts:
        raise GraphError(f"the {node.op_type} feeding {output!r} has no constant weight")
    weights = consts[b].astype(np.float32)
    if node.op_type == "Gemm":
        if int(_attr(node, "transA", 0)):
            raise GraphError("the head Gemm transposes its input (transA=1); unsupported")
        if int(_attr(node, "transB", 0)):
            weights = weights.T
        weights = weights * np.float32(_attr(node, "alpha", 1.0))
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                raise GraphError("the head Gemm's bias is not a constant")
            gemm_bias = consts[node.input[2]].astype(np.float32).reshape(-1)
            gemm_bias = gemm_bias * np.float32(_attr(node, "beta", 1.0))
            bias = gemm_bias if bias is None else bias + gemm_bias
    if weights.ndim != 2:
        raise GraphError(f"head weight has shape {weights.shape}, expected [dim, tags]")
    n_tags = weights.shape[1]
    if bias is None:
        bias = np.zeros(n_tags, dtype=np.float32)
    if bias.size == 1:
        bias = np.full(n_tags, bias.item(), dtype=np.float32)
    if bias.shape != (n_tags,):
        raise GraphError(f"head bias has shape {bias.shape}, expected ({n_tags},)")
    return Head(a, np.ascontiguousarray(weights), bias, sigmoid)


def expose(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy of `model` with `tensor` added as a graph output (ORT only fetches outputs)."""
    import onnx
    from onnx import helper

    patched = onnx.ModelProto()
    patched.CopyFrom(model)
    if any(o.name == tensor for o in patched.graph.output):
        return patched
    patched.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return patched


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy whose batch dimension is symbolic, or None if nothing was fixed at 1.

    Input/output dims are renamed, inferred value_info dropped, and Reshape shape constants
    that hard-code a leading 1 rewritten (to -1, or 0 = copy, if -1 is taken). The result
    still has to be proven equal to single-image runs before it is used.
    """
    import onnx
    from onnx import numpy_helper

    patched = onnx.ModelProto()
    patched.CopyFrom(model)
    graph = patched.graph
    initializer_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in initializer_names]
    changed = False
    for vi in [*real_inputs, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = "batch"
            changed = True
    if not changed:
        return None
    del graph.value_info[:]
    shape_inputs = {n.input[1] for n in graph.node if n.op_type == "Reshape" and len(n.input) > 1}
    for i, t in enumerate(graph.initializer):
        if t.name not in shape_inputs:
            continue
        shape = numpy_helper.to_array(t).copy()
        if shape.ndim == 1 and shape.size > 1 and shape[0] == 1:
            shape[0] = 0 if (shape == -1).any() else -1
            graph.initializer[i].CopyFrom(numpy_helper.from_array(shape, t.name))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in shape_inputs and node.attribute:
            arr = numpy_helper.to_array(node.attribute[0].t).copy()
            if arr.ndim == 1 and arr.size > 1 and arr[0] == 1:
                arr[0] = 0 if (arr == -1).any() else -1
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(arr, node.output[0]))
    return patched


def same_outputs(batched: np.ndarray, singles: np.ndarray, atol: float = 1e-4) -> bool:
    """The batch-N proof: one batch of N equals N single runs."""
    return batched.shape == singles.shape and bool(np.allclose(batched, singles, atol=atol))


@dataclass
class Loaded:
    """What the session is created from: the (possibly patched) graph and its head, if any."""

    model: onnx.ModelProto | None
    head: Head | None
    why_no_head: str | None

    def serialized(self) -> bytes | None:
        return None if self.model is None else self.model.SerializeToString()


def load(path: str, output: str | int = 0) -> Loaded:
    """Read a model and expose its pooled embedding; never fails, says why when it cannot.

    `output` is the scores output (a name, or an index into the graph's outputs)."""
    import onnx

    try:
        model = onnx.load(path)
    except Exception as exc:
        return Loaded(None, None, f"the graph cannot be read by onnx ({type(exc).__name__})")
    try:
        names = [o.name for o in model.graph.output]
        if isinstance(output, int):
            name = names[output] if -len(names) <= output < len(names) else None
        else:
            name = output if output in names else None
        if name is None:
            return Loaded(model, None, f"the graph has no output {output!r}")
        head = find_head(model, name)
    except GraphError as exc:
        return Loaded(model, None, str(exc))
    if model.ByteSize() > 1_900_000_000:
        return Loaded(None, None, "the graph is over 2 GB, too large to patch in memory")
    return Loaded(expose(model, head.embedding), head, None)


def probe_batch(spec: PreprocessSpec, n: int, seed: int = 0) -> np.ndarray:
    """N distinct, realistic inputs: random-noise images through the family's preprocessing."""
    from PIL import Image

    from tagd.tagging.preprocess import prepare

    rng = np.random.default_rng(seed)
    h, w = spec.size
    images = [
        Image.fromarray(rng.integers(0, 256, (h // 2 + 7 * i, w, 3), dtype=np.uint8))
        for i in range(n)
    ]
    return np.stack([prepare(im, spec) for im in images])


class Runs(Protocol):
    """What the proofs need from an open session: its batch shape, input spec and a run."""

    @property
    def fixed_batch(self) -> int | None: ...

    @property
    def spec(self) -> PreprocessSpec: ...

    def predict_with_embeddings(
        self, batch: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


R = TypeVar("R", bound=Runs)


@dataclass(frozen=True)
class Prepared:
    """What a model start proved, for the tagger to be built from and the cache to keep.

    `graph` is the prepared graph worth keeping (the batch-freed one, or the one with the
    embedding exposed); None: the model file as it is runs the same."""

    graph: bytes | None
    head: Head | None
    why_no_head: str | None
    batch_freed: bool


def finish(
    loaded: Loaded,
    data: bytes | None,
    runs: R,
    open_: Callable[[bytes, str | None], R],
    name: str,
) -> tuple[Prepared, R]:
    """After the first session on `data` exists: free a fixed batch if proven safe, then
    verify the head. Returns what was proven and the session to keep.

    A v2 export fixed at batch 1 is patched and kept only if batch-N outputs equal N batch-1
    runs; an embedding is kept only if sigmoid(embedding @ W + b) reproduces the outputs.
    `open_(graph, embedding)` opens a session on graph bytes, fetching that extra output.
    """
    head = loaded.head
    embedding = None if head is None else head.embedding
    kept: bytes | None = None
    if runs.fixed_batch == 1 and loaded.model is not None:
        patched = dynamic_batch(loaded.model)
        if patched is not None:
            probe = probe_batch(runs.spec, 3)
            singles = np.concatenate(
                [runs.predict_with_embeddings(probe[i : i + 1])[0] for i in range(3)]
            )
            candidate = patched.SerializeToString()
            ok = False
            try:
                freed = open_(candidate, embedding)
                ok = freed.fixed_batch is None and same_outputs(
                    freed.predict_with_embeddings(probe)[0], singles
                )
            except Exception as exc:
                log.info("model %s: batch patch does not run (%s)", name, exc)
            if ok:
                log.info("model %s: fixed batch 1 freed; batch-3 == 3 x batch-1", name)
                kept, runs = candidate, freed
            else:
                log.info("model %s: keeps batch 1 (patched batch differs)", name)
    why = loaded.why_no_head
    if head is None:
        log.info("model %s: no embeddings: %s", name, why)
    else:
        probe = probe_batch(runs.spec, 2, seed=1)
        probs, emb = runs.predict_with_embeddings(probe)
        shapes_ok = emb is not None and emb.shape[1] == head.dim
        shapes_ok = shapes_ok and head.weights.shape[1] == probs.shape[1]
        if (
            emb is None
            or not shapes_ok
            or not np.allclose(head.probabilities(emb), probs, atol=1e-3)
        ):
            head = None
            why = "sigmoid(embedding @ W + b) does not reproduce the outputs"
            log.warning("model %s: no embeddings: %s", name, why)
    graph = kept if kept is not None else data if head is not None else None
    return Prepared(graph, head, why, batch_freed=kept is not None), runs
