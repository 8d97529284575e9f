"""timm's models, whose BatchNorm + activation modules call F.batch_norm: they convert with every
conv and linear normalized, and after convert(K=1) only activations and pooling exceed 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipfx

timm = pytest.importorskip("timm")

# (name, input size); efficientnet_b0's squeeze-excitation gates make its certificate infinite
MODELS = [("mobilenetv2_050", 32), pytest.param("resnet18d", 16, marks=pytest.mark.slow),
          pytest.param("efficientnet_b0", 32, marks=pytest.mark.slow)]
OVER_ONE = {"MaxPool2d", "AdaptiveAvgPool2d"}  # pooling: sqrt(windows); the rounding slack of 1


@pytest.mark.parametrize("name,size", MODELS)
def test_timm_bn_act_models_convert_and_normalize_fully(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    for m in model.modules():  # random statistics, so a wrong fold shows in the outputs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, size, size)
    plain = lipfx.convert(model, x, normalize=False)
    assert not [n for n in plain.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)
    net = lipfx.convert(model, x, K=1.0).eval()
    weighted = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert weighted and weighted == {n for n, _, _ in lipfx.normalized_layers(net)}
    if name == "efficientnet_b0":
        return
    cert = lipfx.certificate(net, x[:1])
    over = [(r.label, r.op, r.local) for r in cert.records
            if r.local > 1 + 1e-6 and r.op not in ("placeholder", "output")]
    assert all(op in OVER_ONE for _, op, _ in over), over
