"""XNNPACK's graph passes, without the ones that cannot match the graph they are given.

ExecuTorch's XNNPACK backend runs its whole pass list on every delegated partition (``XNNPACKPassManager``), and
each pass re-traces the whole program with fake tensors, whether or not it finds anything to rewrite. Four of the
passes only rewrite ops that our graphs do not have: batch norm (``FuseBatchNormPass``, ``DecomposeBatchNorm``),
1-d convolution (``Conv1dUnsqueezePass``) and PReLU (``PReLUReshapePass``). Inside :func:`lean_xnnpack_passes`
the pass manager leaves each of them out of a program that has none of its ops; a program that has them gets the
stock list. Skipping a pass that finds nothing changes no byte of the .pte (checked on the tiny encoder, decoder,
denoiser and fused pipeline in fp32 and the tiny INT8 encoder). Measured (session 18 scratch, 1 thread): the tiny decoder's ExecuTorch export
36.5 / 44.5 -> 31.8 / 33.9 s, the tiny denoiser's 138.5 -> 128.1 s.

Two more passes re-trace the whole program to rewrite ops that are often absent: ``ConstPropPass`` (a call on
constants only) and ``DimOrderOpsRevertPass`` (dim-order ops); they are left out the same way. And most of the
rest (``ConvertToLinearPass``, ``FuseActivationPass``, ``PropagateCustomMetaPass``, ``RemoveGetItemPass``,
``RemoveRedundantCopyPass``, ...) end with a re-trace whether or not they changed the graph: inside the block that
re-trace runs only when the graph differs from the one last traced (:func:`_retrace_when_changed`). The bundled
fp32 denoiser's lowering (session 24, 1 thread, both runs side by side): 52.2 -> 44.9 s, the same bytes.

The block also bounds one walk of ``ChannelsLastTaggedReshapePass`` (:func:`_bounded_dynamic_nhwc`): to give a
dynamically quantized convolution its NHWC input, executorch 1.5 walks back from the dequantize through
``args[0]`` until a node has no node argument, past the quantize into ordinary compute, inserts the NHWC copy
there and re-routes every use of that node. With a reshape or a scalar multiply before the layer (as after a
GroupNorm or the bicubic upsampling) the program lowered and then failed on its first ``execute()``
(``xnn_status_invalid_parameter``; tested); the walk here stops at the float tensor the quantize reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["has_batch_norm", "lean_xnnpack_passes", "mixed_scale_cat", "needless_passes", "xnnpack_partitioner"]


def _target_name(node: Any) -> str:
    return str(getattr(node.target, "__name__", node.target))


def has_batch_norm(nodes: Iterable[Any]) -> bool:
    """Whether any call among ``nodes`` is a batch norm (what the conv-bn passes and annotators need)."""
    return any(n.op == "call_function" and "batch_norm" in _target_name(n) for n in nodes)


def _has_prelu(nodes: list[Any]) -> bool:
    return any("prelu" in _target_name(n) for n in nodes)


def _has_non_2d_convolution(nodes: list[Any]) -> bool:
    """A convolution whose output is not 4-d (or whose shape is unknown): the 1-d case the pass unsqueezes."""
    for n in nodes:
        if "convolution" in _target_name(n):
            val = n.meta.get("val")
            if getattr(val, "ndim", None) != 4:
                return True
    return False


def _has_long_cat(nodes: list[Any]) -> bool:
    """A concatenation of more than 5 tensors: what ``DecomposeConcatenate`` splits (XNNPACK's limit)."""
    return any("cat" in _target_name(n) and n.args and len(n.args[0]) > 5 for n in nodes)


def _pattern_ops(patterns: Callable[[], Iterable[Any]]) -> Callable[[list[Any]], bool]:
    """A trigger: the program has every op of one of the pass's own pattern graphs (``patterns()``), which any
    match needs. The clone and dim-order ops are left out: passes that run earlier remove or revert them."""

    def needed(p: Any) -> set[str]:
        names = {_target_name(n) for n in p.graph.nodes if n.op == "call_function"}
        return {t for t in names if "dim_order" not in t and "clone" not in t}

    def may_match(nodes: list[Any]) -> bool:
        have = {_target_name(n) for n in nodes}
        return any(needed(p) <= have for p in patterns())

    return may_match


def _sdpa_patterns() -> Iterable[Any]:
    from executorch.backends.xnnpack.partition.graphs import sdpa

    return sdpa.get_graphs()


def _bilinear_patterns() -> Iterable[Any]:
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d

    return bilinear_2d.get_graphs_dict()


def _has_dim_order_op(nodes: list[Any]) -> bool:
    """A dim-order op (``_to_dim_order_copy``, ``_clone_dim_order``, ...): what ``DimOrderOpsRevertPass`` reverts."""
    return any("dim_order" in _target_name(n) for n in nodes)


def _has_constant_call(nodes: list[Any]) -> bool:
    """A call other than quantize / dequantize whose inputs are all constants (``get_attr``) or none at all: what
    ``ConstPropPass`` folds (a lifted parameter is a placeholder, which it does not fold)."""
    return any("quantize" not in _target_name(n) and all(i.op == "get_attr" for i in n.all_input_nodes)
               for n in nodes)  # fmt: skip


# pass class name -> "the program has something this pass may rewrite" (the passes below rewrite by pattern and
# then re-trace the whole program whether or not they found anything: ~7 s each on the fused INT8 pipeline)
_TRIGGERS: dict[str, Callable[[list[Any]], bool]] = {
    "FuseBatchNormPass": has_batch_norm,
    "DecomposeBatchNorm": has_batch_norm,
    "Conv1dUnsqueezePass": _has_non_2d_convolution,
    "PReLUReshapePass": _has_prelu,
    "DecomposeConcatenate": _has_long_cat,
    "ConvertToSDPAPass": _pattern_ops(_sdpa_patterns),
    "ConvertToUpsampleBilinear2d": _pattern_ops(_bilinear_patterns),
    # full re-traces (``call_operator`` passes) that rewrite only these ops
    "DimOrderOpsRevertPass": _has_dim_order_op,
    "ConstPropPass": _has_constant_call,
}


def needless_passes(program: Any, passes: list[type]) -> list[type]:
    """The passes of ``passes`` that cannot match any call in ``program`` (an ``ExportedProgram``)."""
    nodes = [n for gm in program.graph_module.modules() if hasattr(gm, "graph")
             for n in gm.graph.nodes if n.op == "call_function"]  # fmt: skip
    return [p for p in passes if p.__name__ in _TRIGGERS and not _TRIGGERS[p.__name__](nodes)]


def _fingerprint(gm: Any) -> tuple[Any, ...]:
    """The graph of ``gm`` as data: every node's kind, name, target, arguments and custom metadata."""
    return tuple((n.op, n.name, str(n.target), repr(n.args), repr(n.kwargs), repr(n.meta.get("custom")))
                 for n in gm.graph.nodes)  # fmt: skip


def _retrace_when_changed(pass_: type, state: dict[str, Any]) -> type:
    """``pass_`` whose closing re-trace (``super().call(graph_module)``) is skipped when the graph is still the
    one last traced (``state["traced"]``, a :func:`_fingerprint`): a re-trace of an unchanged graph recomputes the
    same shapes and keeps the same metadata. A pass whose ``call`` is the stock re-trace itself (a
    ``call_operator`` pass) runs as before and records the graph it traced."""
    from executorch.exir.pass_base import ExportPass, PassResult

    if pass_.call is ExportPass.call:

        class Traced(pass_):  # type: ignore[misc,valid-type]
            def call(self, graph_module: Any) -> Any:
                result = super().call(graph_module)
                state["traced"] = _fingerprint(result.graph_module)
                return result

        lean: type = Traced
    else:

        class Retrace(ExportPass):
            def call(self, graph_module: Any) -> Any:
                if _fingerprint(graph_module) == state["traced"]:
                    self.idle_retrace = True
                    return PassResult(graph_module, False)
                result = super().call(graph_module)
                state["traced"] = _fingerprint(result.graph_module)
                return result

        class Lean(pass_, Retrace):  # type: ignore[misc,valid-type]  # pass_'s super().call() is Retrace.call
            def call(self, graph_module: Any) -> Any:
                self.idle_retrace = False
                result = super().call(graph_module)
                return PassResult(result.graph_module, bool(result.modified) and not self.idle_retrace)

        lean = Lean
    lean.__name__ = lean.__qualname__ = pass_.__name__
    return lean


def _bounded_dynamic_nhwc(stock: Callable[..., None]) -> Callable[..., None]:
    """``ChannelsLastTaggedReshapePass.input_to_nhwc`` whose dynamic-quant case copies to NHWC the float tensor that
    the dequantize's own quantize chain reads (and routes only that chain through the copy), not the first node
    found by following ``args[0]`` to the graph's start; every other case is the stock method."""
    import torch
    from executorch.backends.xnnpack._passes.channels_last_tagged_reshape_pass import (
        ChannelsLastTaggedReshapePass as Pass,
        InputDimOrder,
    )
    from executorch.backends.xnnpack.utils.quant_utils import is_dynamic_qdq, is_qparam, is_quant
    from executorch.exir.dialects._ops import ops as exir_ops

    def input_to_nhwc(self: Any, graph_module: Any, input_node: Any, target_node: Any) -> None:
        if (not is_dynamic_qdq(input_node) or Pass.PARTNER_NODE in input_node.meta
                or self.input_dim_order(input_node, InputDimOrder.NHWC)):  # fmt: skip
            return stock(self, graph_module, input_node, target_node)
        source = input_node
        while is_dynamic_qdq(source):  # dequantize -> quantize -> the float tensor
            source = source.args[0]
        copy = source.meta.get(Pass.PARTNER_NODE)
        if copy is None or not Pass.is_nhwc_node(copy):
            with graph_module.graph.inserting_after(source):
                copy = self.create_call_function_node(graph_module=graph_module, args=(source,),
                                                      target=exir_ops.edge.aten._to_copy.default,
                                                      memory_format=torch.channels_last)  # fmt: skip
            Pass.mark_as_nhwc_node(copy)
            self.make_partners(source, copy)
        for user in list(source.users):  # the dynamic quantization of this tensor (choose_qparams, quantize)
            if user is not copy and (is_quant(user) or is_qparam(user)):
                user.replace_input_with(source, copy)

    return input_to_nhwc


@contextlib.contextmanager
def lean_xnnpack_passes() -> Iterator[None]:
    """Inside the block, ``XNNPACKPassManager`` built with the default pass list drops :func:`needless_passes`
    and re-traces only changed graphs (:func:`_retrace_when_changed`), and the channels-last pass walks back from a
    dynamically quantized input only to its quantize (:func:`_bounded_dynamic_nhwc`).

    An explicit pass list is left alone. Nests, and restores the class on exit. Without ExecuTorch it does nothing.
    """
    try:
        from executorch.backends.xnnpack._passes import XNNPACKPassManager
        from executorch.backends.xnnpack._passes.channels_last_tagged_reshape_pass import (
            ChannelsLastTaggedReshapePass as ChannelsLast,
        )
    except ImportError:
        yield
        return
    stock = XNNPACKPassManager.__init__
    stock_nhwc = ChannelsLast.input_to_nhwc

    def init(self: Any, exported_program: Any, passes: Any = None) -> None:
        stock(self, exported_program, passes)
        if not passes:
            skip = needless_passes(exported_program, self.passes)
            state = {"traced": _fingerprint(exported_program.graph_module)}  # the partition arrives traced
            self.passes = [_retrace_when_changed(p, state) for p in self.passes if p not in skip]

    XNNPACKPassManager.__init__ = init
    ChannelsLast.input_to_nhwc = _bounded_dynamic_nhwc(stock_nhwc)
    try:
        yield
    finally:
        XNNPACKPassManager.__init__ = stock
        ChannelsLast.input_to_nhwc = stock_nhwc


def _per_tensor_qparams(node: Any) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor quantize / dequantize node with constant parameters, else None."""
    if "per_tensor" not in _target_name(node) or len(node.args) < 3:
        return None
    scale, zero_point = node.args[1], node.args[2]
    if not isinstance(scale, (int, float)) or not isinstance(zero_point, int):
        return None
    return float(scale), int(zero_point)


def mixed_scale_cat(node: Any) -> bool:
    """Whether ``node`` (a ``cat``) sits between dequantize inputs and one quantize user with differing parameters.

    XNNPACK's partitioner lowers such a ``dequantize -> cat -> quantize`` to a QS8 concatenation, whose inputs and
    output must share one scale and zero point; with differing ones the program fails to load ("Failed to create
    cat2 node ... xnn_status_invalid_parameter"). A float ``cat`` between INT8 blocks (a recipe's float block)
    has that shape.
    """
    inputs = node.all_input_nodes
    if len(inputs) < 2 or not all("dequantize" in _target_name(i) for i in inputs) or len(node.users) != 1:
        return False
    (user,) = node.users
    if "quantize" not in _target_name(user) or "dequantize" in _target_name(user):
        return False
    params = [_per_tensor_qparams(n) for n in (*inputs, user)]
    return None not in params and len(set(params)) > 1


def xnnpack_partitioner() -> Any:
    """``XnnpackPartitioner`` whose ``cat`` stays float where its quantized neighbours disagree on the scale.

    Such a ``cat`` (see :func:`mixed_scale_cat`) is delegated in fp32 with its dequantize and quantize neighbours
    as explicit conversions: what the INT8 graph computes (and the recipe search simulated), instead of a QS8
    concatenation XNNPACK refuses at load time. Every other node is partitioned as the stock partitioner does.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import CatConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class FloatMixedScaleCat(CatConfig):
        def get_node_and_deps(self, node: Any, ep: Any) -> list[Any]:
            if mixed_scale_cat(node):
                return [node]
            return super().get_node_and_deps(node, ep)

    configs = [FloatMixedScaleCat if c is CatConfig else c for c in ALL_PARTITIONER_CONFIGS]
    assert FloatMixedScaleCat in configs, "executorch's XNNPACK partitioner has no CatConfig"
    return XnnpackPartitioner(configs=configs)
