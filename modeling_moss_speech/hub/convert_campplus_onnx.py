"""Convert the release's CAM++ speaker encoder (`flow/campplus.onnx`) into a state dict of
`MossSpeechCodecSpeakerEncoder`, reading the ONNX file with the `onnx` package only (no onnxruntime).

Initializer names of an exported model are not reliable: the TorchScript exporter folds each Conv → BatchNorm pair
into one Conv with opaque names (`onnx::Conv_123`), and the dynamo exporter's optimiser merges equal-valued
initializers (a fresh BatchNorm's weight and running_var become one tensor). So tensors are assigned by graph
structure: the Conv and BatchNormalization nodes, in the graph's (topological, execution) order, are matched to the
module's convolutions and BatchNorms in forward order, each by its role in the node (weight/bias, scale/B/mean/var),
checking shapes and conv attributes. Among independent branches (a residual block's shortcut, the CAM layer's local
conv) exporters may interleave nodes differently; those convs differ in kernel size, so each module conv takes the
first unconsumed ONNX Conv of its shape. A folded Conv+BN becomes the conv weight plus an identity BatchNorm carrying
the folded bias. Every target tensor must be filled and every Conv/BatchNormalization node used, or a ValueError
lists what is missing or unused.

CLI: `python -m modeling_moss_speech.hub.convert_campplus_onnx campplus.onnx campplus.safetensors`
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..configuration_moss_speech_codec import MossSpeechCodecSpeakerConfig
from ..modeling_moss_speech_codec_speaker import MossSpeechCodecSpeakerEncoder

# ONNX ops that carry learned weights; a model holding any other than Conv / BatchNormalization is not CAM++.
_PARAMETRIC_OPS = {"Conv", "BatchNormalization", "Gemm", "MatMul", "PRelu", "ConvTranspose", "LayerNormalization",
                   "InstanceNormalization"}


@dataclass
class _OnnxOp:
    index: int
    node: object
    tensors: list[torch.Tensor | None]
    names: list[str]
    attributes: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.node.op_type} node #{self.index} {self.node.name!r} (inputs {self.names[1:]})"


def _load_graph(path: str | Path):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Converting campplus.onnx needs the `onnx` package: pip install onnx") from error
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be an existing .onnx file, got {str(path)!r}.")
    model = onnx.load(str(path))  # also loads external data stored beside the file
    graph = model.graph
    values: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    aliases: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
        elif node.op_type == "Identity":
            aliases[node.output[0]] = node.input[0]

    def resolve(name: str) -> torch.Tensor | None:
        seen = set()
        while name in aliases and name not in seen:
            seen.add(name)
            name = aliases[name]
        if name not in values:
            return None
        return torch.from_numpy(np.array(values[name], dtype=np.float32, copy=True))

    ops = []
    consumers: dict[str, list[str]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
        if node.op_type in _PARAMETRIC_OPS:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            names = list(node.input)
            ops.append(_OnnxOp(index, node, [resolve(n) if n else None for n in names], names, attributes))
    return ops, consumers


def _conv_attributes_match(op: _OnnxOp, conv: nn.Conv1d | nn.Conv2d) -> bool:
    rank = conv.weight.dim() - 2
    expected = {"strides": list(conv.stride), "dilations": list(conv.dilation), "group": conv.groups}
    actual = {"strides": list(op.attributes.get("strides", [1] * rank)),
              "dilations": list(op.attributes.get("dilations", [1] * rank)),
              "group": int(op.attributes.get("group", 1))}
    if "pads" in op.attributes:
        expected["pads"] = list(conv.padding) * 2
        actual["pads"] = list(op.attributes["pads"])
    return expected == actual


def _take_conv(ops: list[_OnnxOp], used: set[int], conv: nn.Conv1d | nn.Conv2d) -> _OnnxOp | None:
    for op in ops:
        if op.index in used or op.node.op_type != "Conv":
            continue
        weight = op.tensors[1]
        if weight is not None and tuple(weight.shape) == tuple(conv.weight.shape) and _conv_attributes_match(op, conv):
            return op
    return None


def _take_batchnorm(ops: list[_OnnxOp], used: set[int], channels: int, affine: bool) -> _OnnxOp | None:
    """First unused BatchNormalization with `channels` statistics; a non-affine target also accepts a node whose
    scale/shift are computed in the graph (exporters build the implicit ones/zeros with ConstantOfShape/Expand)."""
    for op in ops:
        if op.index in used or op.node.op_type != "BatchNormalization":
            continue
        scale_shift_ok = all((t is None and not affine) or (t is not None and tuple(t.shape) == (channels,))
                             for t in op.tensors[1:3])
        if scale_shift_ok and all(t is not None and tuple(t.shape) == (channels,) for t in op.tensors[3:5]):
            return op
    return None


def _layer_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convs and BatchNorms in forward order (for CAM++, registration order is execution order)."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]


def campplus_state_dict_from_onnx(
    path: str | Path, config: MossSpeechCodecSpeakerConfig | None = None, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Read a CAM++ ONNX export and return a float32 state dict for `MossSpeechCodecSpeakerEncoder(config)`.

    Args:
        path: the `.onnx` file (external data, if any, beside it).
        config: the speaker encoder's config; the release's (`MossSpeechCodecSpeakerConfig()`) when None.
        prefix: prepended to every key (e.g. `"speaker_encoder."` for the full codec's state dict).
    Raises:
        ValueError: when a target tensor cannot be filled or an ONNX Conv/BatchNormalization node stays unused
            (the message lists them), or the graph holds other weighted ops.
    """
    config = config if config is not None else MossSpeechCodecSpeakerConfig()
    if not isinstance(config, MossSpeechCodecSpeakerConfig):
        raise TypeError(f"config must be a MossSpeechCodecSpeakerConfig or None, got {type(config).__name__}.")
    ops, consumers = _load_graph(path)
    unsupported = [op.describe() for op in ops if op.node.op_type not in ("Conv", "BatchNormalization")
                   and any(t is not None and t.numel() > 1 for t in op.tensors)]
    if unsupported:
        raise ValueError(f"{path}: weighted ONNX ops that CAM++ does not have: {unsupported}.")

    with torch.device("meta"):
        model = MossSpeechCodecSpeakerEncoder(config)
    targets = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    used: set[int] = set()
    problems: list[str] = []
    slots = _layer_slots(model)
    folded: dict[str, torch.Tensor] = {}  # BN name → bias of the Conv it was folded into

    for position, (name, module) in enumerate(slots):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            op = _take_conv(ops, used, module)
            if op is None:
                problems.append(f"{name}: no unused ONNX Conv with weight shape {tuple(module.weight.shape)}, "
                                f"stride {module.stride}, dilation {module.dilation}")
                continue
            used.add(op.index)
            state[f"{name}.weight"] = op.tensors[1]
            bias = op.tensors[2] if len(op.tensors) > 2 else None
            if module.bias is not None:
                state[f"{name}.bias"] = bias if bias is not None else torch.zeros(module.out_channels)
                continue
            if bias is None:
                continue
            following = slots[position + 1] if position + 1 < len(slots) else None
            feeds_batchnorm = "BatchNormalization" in consumers.get(op.node.output[0], [])
            if (following is not None and isinstance(following[1], (nn.BatchNorm1d, nn.BatchNorm2d))
                    and following[1].num_features == module.out_channels and not feeds_batchnorm):
                folded[following[0]] = bias
            elif bias.abs().max() > 0:
                problems.append(f"{name}: the ONNX Conv {op.describe()} has a non-zero bias but the module conv has "
                                f"none and no BatchNorm follows it to absorb it")
            continue

        eps = module.eps
        if name in folded:  # a BN that only adds the folded bias: var + eps == 1 (exactly, for eps 1e-5 in float32)
            channels = module.num_features
            state[f"{name}.running_var"] = torch.full((channels,), 1.0 - eps)
            if module.affine:
                state[f"{name}.weight"] = torch.ones(channels)
                state[f"{name}.bias"] = folded[name]
                state[f"{name}.running_mean"] = torch.zeros(channels)
            else:
                state[f"{name}.running_mean"] = -folded[name]
        else:
            op = _take_batchnorm(ops, used, module.num_features, module.affine)
            if op is None:
                problems.append(f"{name}: no unused ONNX BatchNormalization with {module.num_features} channels")
                continue
            used.add(op.index)
            scale, shift, mean, var = op.tensors[1:5]
            onnx_eps = float(op.attributes.get("epsilon", 1e-5))
            state[f"{name}.running_mean"] = mean
            if np.float32(onnx_eps) != np.float32(eps):
                var = var + (onnx_eps - eps)  # keep var + eps equal to the ONNX node's
            state[f"{name}.running_var"] = var
            if module.affine:
                state[f"{name}.weight"] = scale
                state[f"{name}.bias"] = shift
            elif not ((scale is None or torch.equal(scale, torch.ones_like(scale)))
                      and (shift is None or torch.equal(shift, torch.zeros_like(shift)))):
                problems.append(f"{name}: non-affine BatchNorm, but the ONNX node {op.describe()} has a scale/shift "
                                f"that is not identity")
        if module.track_running_stats:
            state[f"{name}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)

    for key, target in targets.items():
        if key in state and tuple(state[key].shape) != tuple(target.shape):
            problems.append(f"{key}: shape {tuple(state[key].shape)} from ONNX, expected {tuple(target.shape)}")
    missing = sorted(set(targets) - set(state))
    unused = [op.describe() for op in ops if op.index not in used and op.node.op_type in ("Conv", "BatchNormalization")]
    if missing or unused or problems:
        raise ValueError(
            f"{path} does not map onto MossSpeechCodecSpeakerEncoder(config): missing target tensors {missing}; "
            f"unused ONNX ops {unused}; problems {problems}."
        )
    return {f"{prefix}{key}": state[key].contiguous() for key in targets}


def main(argv: list[str] | None = None) -> None:
    """CLI: convert `campplus.onnx` to a safetensors file loadable by `MossSpeechCodecSpeakerEncoder` (strict)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx_path", help="the release's flow/campplus.onnx")
    parser.add_argument("output_path", help="where to write the .safetensors state dict")
    parser.add_argument("--prefix", default="", help="key prefix, e.g. 'speaker_encoder.'")
    parser.add_argument("--config", default=None,
                        help="JSON file of a MossSpeechCodecSpeakerConfig (default: the release's sizes)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    config = MossSpeechCodecSpeakerConfig.from_json_file(args.config) if args.config else MossSpeechCodecSpeakerConfig()
    state = campplus_state_dict_from_onnx(args.onnx_path, config, prefix=args.prefix)
    model = MossSpeechCodecSpeakerEncoder(config)
    model.load_state_dict({k[len(args.prefix):]: v for k, v in state.items()}, strict=True)
    save_file(state, args.output_path, metadata={"format": "pt", "source": Path(args.onnx_path).name})
    print(f"wrote {len(state)} tensors to {args.output_path}")


if __name__ == "__main__":
    main()
