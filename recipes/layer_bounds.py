"""Per-layer operator-norm bounds of a torchvision model, three methods side by side.

Randomly initialised (pretrained weights need a download; pass --weights FILE for a state_dict).
Input sizes of each layer come from one forward pass with hooks (lipfx.tracing.layer_input_shapes).

    python recipes/layer_bounds.py [--model resnet18] [--size 224] [--weights FILE]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

from lipfx.norms import layer_bound
from lipfx.tracing import layer_input_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--weights", default=None, help="optional state_dict file")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    shapes = layer_input_shapes(model, torch.zeros(1, 3, args.size, args.size))

    start = time.perf_counter()
    print(f"{'layer':<24} {'input':>14} {'lipfx':>9} {'paper':>9} {'singla-feizi':>12}")
    product = 1.0
    for name, m in model.named_modules():
        if name not in shapes:
            continue
        shape = shapes[name]
        ours = layer_bound(m, shape, name=name)
        product *= ours
        if isinstance(m, nn.Conv2d):
            paper = f"{layer_bound(m, shape, method='paper'):9.3f}"
            sf = f"{layer_bound(m, shape, method='singla-feizi'):12.3f}"
        else:
            paper, sf = f"{'-':>9}", f"{'-':>12}"
        print(f"{name:<24} {'x'.join(map(str, shape)):>14} {ours:9.3f} {paper} {sf}")
    print(f"\n{len(shapes)} layers bounded in {time.perf_counter() - start:.1f} s; "
          f"product of the per-layer bounds: {product:.4g}")


if __name__ == "__main__":
    main()
