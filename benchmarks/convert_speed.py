"""Conversion time of each torchvision zoo model (construction excluded), default options.

    python benchmarks/convert_speed.py [--size 224]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import lipfx

MODELS = {
    "resnet18": {}, "resnet50": {}, "resnext50_32x4d": {}, "wide_resnet50_2": {}, "mobilenet_v2": {},
    "mobilenet_v3_small": {}, "efficientnet_b0": {}, "mnasnet0_5": {}, "shufflenet_v2_x1_0": {},
    "squeezenet1_0": {}, "vgg11": {}, "alexnet": {}, "densenet121": {},
    "googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False, "init_weights": True},
    "regnet_x_400mf": {}, "convnext_tiny": {}, "vit_b_16": {}, "swin_t": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'model':<20} {'convert (s)':>11} {'rewritten convs':>15}")
    for name, kwargs in MODELS.items():
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
        size = max(args.size, 299) if name == "inception_v3" else args.size
        x = torch.randn(1, 3, size, size)
        start = time.perf_counter()
        net = lipfx.convert(model, x, normalize=False)
        elapsed = time.perf_counter() - start
        rewritten = len([r for r in net.lipfx_report.records if r.action.startswith("separable")])
        print(f"{name:<20} {elapsed:11.2f} {rewritten:15d}", flush=True)


if __name__ == "__main__":
    main()
