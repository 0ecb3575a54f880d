#!/usr/bin/env python3
"""A variant of the full-size benchmark encoder whose LayerNorms have a trained model's shape.

The benchmark model (models/gigaam-v3-full-random, make_model.py) keeps every LayerNorm's scale
at 1 and bias at 0, as PyTorch initialises them; tract folds that pair away, so the benchmark
never times the scale-and-bias pass a trained model has. This writes OUT_DIR/v3_e2e_rnnt_encoder.onnx
with each LayerNorm given its own scale 1 + 0.05 N(0,1) and bias 0.02 N(0,1) (seeded), and its int8
(the recipe of make_model.py: onnxruntime quantize_dynamic, QInt8 weights, per channel, value_info
stripped). docs/perf.md, twelfth round, measured AxisNorm's scale and bias on it:

    .venv-bench/bin/python bench/trained_norms.py \\
        models/gigaam-v3-full-random/gen/v3_e2e_rnnt_encoder.onnx /tmp/trained-norms
    PROBE_TUNE=1 ... target/release/examples/shape_probe /tmp/trained-norms/v3_e2e_rnnt_encoder_int8.onnx 1000
"""
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

SEED = 7


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out_dir = sys.argv[1], sys.argv[2]
    model = onnx.load(src)
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def width_of(name):
        # The export shares one scale among the norms through Identity nodes.
        while name not in initializers:
            name = producers[name].input[0]
        return initializers[name].dims[-1]

    rng = np.random.default_rng(SEED)
    norms = 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        width = width_of(node.input[1])
        scale = (1 + 0.05 * rng.standard_normal(width)).astype(np.float32)
        bias = (0.02 * rng.standard_normal(width)).astype(np.float32)
        names = (f"trained_norm_scale_{norms}", f"trained_norm_bias_{norms}")
        model.graph.initializer.extend(
            [numpy_helper.from_array(scale, names[0]), numpy_helper.from_array(bias, names[1])]
        )
        node.input[1] = names[0]
        if len(node.input) > 2:
            node.input[2] = names[1]
        else:
            node.input.append(names[1])
        norms += 1
    os.makedirs(out_dir, exist_ok=True)
    fp32 = os.path.join(out_dir, "v3_e2e_rnnt_encoder.onnx")
    onnx.save(model, fp32)
    print(f"{fp32}: {norms} LayerNorms with their own scale and bias")

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantized = os.path.join(tmp, "q.onnx")
        quantize_dynamic(fp32, quantized, weight_type=QuantType.QInt8, per_channel=True)
        int8 = onnx.load(quantized)
    del int8.graph.value_info[:]
    path = os.path.join(out_dir, "v3_e2e_rnnt_encoder_int8.onnx")
    onnx.save(int8, path)
    print(path)


if __name__ == "__main__":
    main()
