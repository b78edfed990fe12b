"""Export Itera-Lite: ONNX graphs with explicit state (default), a GraniteMoeHybrid folder or a llama.cpp GGUF file.

The ONNX export is two graphs with explicit recurrent state, for onnxruntime without PyTorch.
`python -m modeling_itera.export --model FOLDER_OR_HUB_ID --output DIR [--int8]` writes:

- `decode.onnx`: `input_ids` (b, 1) and, per layer i, `conv_state_i` (b, conv_dim, K) and `ssm_state_i` (b, h, p, n)
  -> `logits` (b, 1, vocab) and `new_conv_state_i`, `new_ssm_state_i`.
- `prefill.onnx`: `input_ids` (b, l), `attention_mask` (b, l) (1 = token, 0 = left padding) and the same states
  (zeros for a fresh prompt) -> the logits of the last position (b, 1, vocab) and the states after it. `l` must be a
  multiple of `chunk_size` (the runtime left-pads a fresh prompt to one): the chunked scan pads its input to whole
  chunks with a branch on the length, and a length that is a multiple of the chunk is the one form of a dynamic
  length for which that branch is the same for every value.
- `itera_onnx.json`: what the graphs take and return (names, shapes, dtypes), the model's config and its hash, the
  opset and IR versions; `onnx_runtime.py` checks a folder against it before it runs anything.
- the tokenizer files and `generation_config.json` of the model.

The exporter is `torch.onnx.export(..., dynamo=True)` on two small wrapper modules that take and return plain
tensors. transformers' own `exporters` (`export_for_generation`) capture the cache as a `DynamicCache` pytree from a
`generate()` call, which gives a prefill without state inputs, a decode graph whose inputs are named after the
cache's internals, and a prefill whose MoE takes the grouped-matmul form; the wrapper here states the contract.

`--format granite --output DIR` writes the GraniteMoeHybrid folder (`export_granite.py`), `--format gguf --output
FILE.gguf [--outtype f32|f16|q8_0]` the GGUF file for llama.cpp's granitehybrid (`export_gguf.py`); both are writers
over the one mapping of our weights in `granite.py`.

Not part of the model's remote code: modeling_itera.py does not import this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM

# ONNX opset 18 (onnxruntime >= 1.14) and IR version 10 (onnx >= 1.16, onnxruntime >= 1.17): pinned, so that a graph
# exported with a newer torch still loads in an older runtime.
OPSET_VERSION = 18
IR_VERSION = 10
FORMAT_VERSION = 1
METADATA_FILE = "itera_onnx.json"
GRAPHS = ("prefill", "decode")
FORMATS = ("onnx", "granite", "gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# The config fields that change the graphs (not, e.g., the training-only loss coefficient).
HASHED_FIELDS = (
    "model_type vocab_size hidden_size num_hidden_layers state_size expand head_dim conv_kernel chunk_size "
    "intermediate_size num_experts num_experts_per_tok moe_intermediate_size moe_layer_period moe_layer_offset "
    "rms_norm_eps tie_word_embeddings"
).split()


def config_hash(config: IteraLiteConfig | dict) -> str:
    """sha256 of the config fields that shape the graphs, so that a graph from another model can be told apart."""
    values = config if isinstance(config, dict) else config.to_dict()
    picked = {k: values.get(k) for k in HASHED_FIELDS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def state_shapes(config: IteraLiteConfig) -> dict[str, list]:
    """Per-layer state shapes, batch as "batch": the conv window (b, conv_dim, K) and the SSM state (b, h, p, n)."""
    conv_dim = config.intermediate_ssm_size + 2 * config.state_size
    return {
        "conv_state": ["batch", conv_dim, config.conv_kernel],
        "ssm_state": ["batch", config.num_heads, config.head_dim, config.state_size],
    }


class ExplicitStateCache:
    """The three cache methods the mixer calls, over plain tensors: the ONNX graphs take and return the states.

    The states are cloned first: the decode step updates the SSM state in place, and a graph input must not be.
    """

    def __init__(self, conv_states, ssm_states):
        self.conv = [s.clone() for s in conv_states]
        self.ssm = [s.clone() for s in ssm_states]

    def update_conv_state(self, new: torch.Tensor, layer_idx: int, conv_kernel_size: int, **kwargs) -> torch.Tensor:
        """(b, conv_dim, l) new inputs -> the last K cached ones followed by them; keeps the last K."""
        full = torch.cat([self.conv[layer_idx], new.to(self.conv[layer_idx].dtype)], dim=-1)
        self.conv[layer_idx] = full[..., -conv_kernel_size:]
        return full

    def get_recurrent_state(self, layer_idx: int) -> torch.Tensor:
        return self.ssm[layer_idx]

    def update_recurrent_state(self, state: torch.Tensor, layer_idx: int) -> None:
        self.ssm[layer_idx] = state

    def flat(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.conv, self.ssm) for t in pair]


class StepGraph(nn.Module):
    """(input_ids, [attention_mask], conv_0, ssm_0, conv_1, ssm_1, ...) -> (last logits, new states), plain tensors."""

    def __init__(self, model: IteraLiteForCausalLM, with_mask: bool):
        super().__init__()
        self.model, self.with_mask = model, with_mask

    def forward(self, input_ids: torch.Tensor, *rest: torch.Tensor):
        mask, states = (rest[0], rest[1:]) if self.with_mask else (None, rest)
        cache = ExplicitStateCache(states[0::2], states[1::2])
        out = self.model(input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        return (out.logits.float(), *cache.flat())


def io_names(config: IteraLiteConfig, graph: str) -> tuple[list[str], list[str]]:
    states = [f"{kind}_{i}" for i in range(config.num_hidden_layers) for kind in ("conv_state", "ssm_state")]
    inputs = ["input_ids", *(["attention_mask"] if graph == "prefill" else []), *states]
    return inputs, ["logits", *(f"new_{s}" for s in states)]


def sample_inputs(config: IteraLiteConfig, graph: str, batch: int = 2, chunks: int = 2):
    """Example inputs for tracing: batch 2 and (prefill) two chunks, so that neither size is specialised to 1."""
    length = 1 if graph == "decode" else chunks * config.chunk_size
    shapes = state_shapes(config)
    ids = torch.randint(0, config.vocab_size, (batch, length))
    args = [ids] + ([torch.ones(batch, length, dtype=torch.long)] if graph == "prefill" else [])
    for _ in range(config.num_hidden_layers):
        args.append(torch.zeros(batch, *shapes["conv_state"][1:]))
        args.append(torch.zeros(batch, *shapes["ssm_state"][1:]))
    return tuple(args)


def dynamic_shapes(config: IteraLiteConfig, graph: str):
    batch = torch.export.Dim("batch", min=1, max=4096)
    ids = {0: batch}
    if graph == "prefill":
        ids = {0: batch, 1: config.chunk_size * torch.export.Dim("chunks", min=1, max=1 << 16)}
    rest = ([dict(ids)] if graph == "prefill" else []) + [{0: batch}] * (2 * config.num_hidden_layers)
    return (ids, tuple(rest))  # the structure of `StepGraph.forward(input_ids, *rest)`


def export_graph(model: IteraLiteForCausalLM, graph: str, path: Path) -> None:
    """Trace one graph (dense MoE for every length) and save it with the opset and IR version pinned."""
    import onnx

    config = model.config
    moes = [layer.feed_forward for layer in model.model.layers if layer.is_moe]
    inputs, outputs = io_names(config, graph)
    for moe in moes:
        moe.static_dispatch = True
    model.model.skip_token_range_check = True  # the runtime checks the ids; a graph cannot raise
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                StepGraph(model, with_mask=graph == "prefill").eval(),
                sample_inputs(config, graph),
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dynamic_shapes(config, graph),
                opset_version=OPSET_VERSION,
                optimize=True,
                verbose=False,
            )
    finally:
        for moe in moes:
            moe.static_dispatch = False
        model.model.skip_token_range_check = False
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    stamp = {"itera_config_hash": config_hash(config), "itera_graph": graph}
    for key, value in stamp.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def graph_io(config: IteraLiteConfig, graph: str) -> dict:
    """The JSON description of one graph's inputs and outputs."""
    shapes = state_shapes(config)
    length = "1" if graph == "decode" else f"length (a multiple of {config.chunk_size})"
    inputs, outputs = io_names(config, graph)

    def describe(name: str) -> dict:
        if name in ("input_ids", "attention_mask"):
            return {"name": name, "shape": ["batch", length], "dtype": "int64"}
        if name == "logits":
            return {"name": name, "shape": ["batch", 1, config.vocab_size], "dtype": "float32"}
        kind = "conv_state" if "conv_state" in name else "ssm_state"
        return {"name": name, "shape": shapes[kind], "dtype": "float32"}

    return {"file": f"{graph}.onnx", "inputs": [describe(n) for n in inputs], "outputs": [describe(n) for n in outputs]}


def matmuls_with_constant_weights(proto) -> None:
    """Rewrites the graph so that every weight matmul is a `MatMul(x, W)` with `W` an initializer, the one form that
    onnxruntime's dynamic quantization handles: `Gemm(x, W, transB=1)` without bias (a `nn.Linear` on 2-D tokens,
    the MoE's) becomes `MatMul(x, W^T)`, and `Transpose(W)` of an initializer (the LM head tied to the embedding)
    becomes the transposed initializer, so the embedding's Gather and the head's MatMul are quantized each."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}

    def add_transposed(name: str, perm=None) -> str:
        new = f"{name}.T"
        if new not in inits:
            inits[new] = numpy_helper.from_array(numpy_helper.to_array(inits[name]).transpose(perm).copy(), new)
            proto.graph.initializer.append(inits[new])
        return new

    folded = {}  # Transpose output -> transposed initializer
    for node in list(proto.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Transpose" and node.input[0] in inits:
            folded[node.output[0]] = add_transposed(node.input[0], attrs.get("perm"))
            proto.graph.node.remove(node)
            continue
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1
        if node.op_type == "Gemm" and len(node.input) == 2 and plain and node.input[1] in inits:
            node.op_type, node.input[1] = "MatMul", add_transposed(node.input[1])
            del node.attribute[:]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in folded:
                node.input[i] = folded[name]
    used = {i for n in proto.graph.node for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def quantize_int8(path: Path) -> None:
    """onnxruntime's dynamic quantization of the MatMul weights (int8 per channel, activations quantized per call)
    and of the embedding table (Gather); the scan, the conv, the norms and the states stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(path))
    matmuls_with_constant_weights(proto)
    tmp = path.with_suffix(".fp32.onnx")
    onnx.save(proto, str(tmp))
    path.unlink()
    quantize_dynamic(
        tmp, path, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gather"]
    )
    tmp.unlink()


def load_for_export(model_id: str):
    """The fp32 model, its tokenizer and its generation config (None if it has none) from a folder or Hub id."""
    from transformers import AutoTokenizer, GenerationConfig

    model = IteraLiteForCausalLM.from_pretrained(model_id, dtype=torch.float32).eval()
    try:
        generation_config = GenerationConfig.from_pretrained(model_id)
    except OSError:  # a model without generation_config.json: the runtime's defaults (greedy)
        generation_config = None
    return model, AutoTokenizer.from_pretrained(model_id), generation_config


def export(model_id: str, output: str | Path, int8: bool = False) -> Path:
    """Export `model_id` (folder or Hub id) into the folder `output`, with its tokenizer; returns the folder."""
    model, tokenizer, generation_config = load_for_export(model_id)
    return export_model(model, output, int8=int8, tokenizer=tokenizer, generation_config=generation_config)


def export_model(model: IteraLiteForCausalLM, out: Path, int8: bool = False, tokenizer=None, generation_config=None):
    """Export an in-memory model into `out` (the tests use this on a model they build); returns `out`."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    for graph in GRAPHS:
        export_graph(model, graph, out / f"{graph}.onnx")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    metadata = {
        "format": "itera-lite-onnx",
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "config_hash": config_hash(config),
        "config": {k: config.to_dict().get(k) for k in HASHED_FIELDS},
        "vocab_size": config.vocab_size,
        "num_hidden_layers": config.num_hidden_layers,
        "chunk_size": config.chunk_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "state_shapes": state_shapes(config),
        "state_dtype": "float32",
        "int8": False,
        "opset_version": OPSET_VERSION,
        "ir_version": IR_VERSION,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}, onnx {onnx.__version__}",
        "graphs": {graph: graph_io(config, graph) for graph in GRAPHS},
        "file_bytes": {f"{g}.onnx": (out / f"{g}.onnx").stat().st_size for g in GRAPHS},
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    if int8:
        quantize_export(out)
    return out


def quantize_export(folder: Path) -> None:
    """Quantizes the graphs of an fp32 export folder in place (`quantize_int8`) and records it in its metadata."""
    folder = Path(folder)
    metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    if metadata["int8"]:
        raise ValueError(f"{folder} is quantized already")
    for graph in GRAPHS:
        quantize_int8(folder / f"{graph}.onnx")
    metadata["int8"] = True
    metadata["file_bytes"] = {f"{g}.onnx": (folder / f"{g}.onnx").stat().st_size for g in GRAPHS}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from .export_gguf import OUTTYPES

    parser = argparse.ArgumentParser(prog="python -m modeling_itera.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--output", required=True, help="folder to write into (onnx, granite) or the .gguf file")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default), granite or gguf")
    parser.add_argument("--int8", action="store_true", help="onnx: dynamic int8 quantization of the matmul weights")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32", help="gguf: the type of the weight matrices")
    args = parser.parse_args(argv)
    if args.int8 and args.format != "onnx":
        parser.error("--int8 is for --format onnx; a quantized GGUF is --format gguf --outtype q8_0")
    if args.format != "onnx":
        return export_engine_format(args.model, args.output, args.format, args.outtype)
    out = export(args.model, args.output, int8=args.int8)
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.2f} MB" for f in sorted(out.glob("*.onnx")))
    print(f"wrote {out}: {sizes}")
    return 0


def export_engine_format(model_id: str, output: str, fmt: str, outtype: str) -> int:
    """`--format granite` (a folder) or `--format gguf` (a file) from `model_id`; prints what it wrote."""
    from .export_gguf import check_expressible, write_gguf
    from .export_granite import write_granite_folder

    model, tokenizer, generation_config = load_for_export(model_id)
    if fmt == "granite":
        out = write_granite_folder(model, output, tokenizer=tokenizer, generation_config=generation_config)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        print(f"wrote {out}: GraniteMoeHybrid, model.safetensors {size / 1e6:.2f} MB")
        return 0
    try:
        check_expressible(model.config)
    except ValueError as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    out = write_gguf(model, output, tokenizer, outtype=outtype, name=Path(model_id).name)
    print(f"wrote {out}: GGUF granitehybrid {outtype}, {out.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
