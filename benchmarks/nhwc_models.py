"""Keras-style NHWC models as PyTorch (TorchScript exporter) writes them, for the
simplify_vs_peers bench's ``--set dir:OUT`` (issue 16: transposes and casts).

    ~/.cache/onnxforge/synth-venv/bin/python benchmarks/nhwc_models.py OUT

nhwc_block: permutes around each conv (a Keras layer on NHWC), NHWC pads, a channel
concat with the input, an NHWC global max and a float->double->float round trip.
keras_same: 'same' padding computed from the fixed spatial size, strided conv, casts.
Needs torch (never a dependency of the package); writes OUT/<name>.onnx, batch dynamic.
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def nhwc_conv(conv, x):
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        h = torch.relu(nhwc_conv(self.c1, F.pad(x, (0, 0, 1, 1, 1, 1))))
        h = nhwc_conv(self.c2, F.pad(h.double().float(), (0, 0, 1, 1, 1, 1)))
        y = nhwc_conv(self.c3, torch.cat([h, x], dim=-1))
        return torch.sigmoid(y - y.amax(dim=(1, 2), keepdim=True))


def same_pad(x, k, s):
    h, w = x.shape[1], x.shape[2]
    ph = torch.clamp((torch.ceil(torch.tensor(h, dtype=torch.float32) / s) - 1) * s + k - h, min=0).to(torch.int64)
    pw = torch.clamp((torch.ceil(torch.tensor(w, dtype=torch.float32) / s) - 1) * s + k - w, min=0).to(torch.int64)
    return F.pad(x, (0, 0, int(pw // 2), int(pw - pw // 2), int(ph // 2), int(ph - ph // 2)))


class KerasSame(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 16, 3, stride=2), nn.Conv2d(16, 16, 3)

    def forward(self, x):
        h = nhwc_conv(self.c1, same_pad(x.to(torch.float32), 3, 2))
        h = torch.relu(h.to(torch.float64).to(torch.float32))
        return nhwc_conv(self.c2, same_pad(h, 3, 1)).mean(dim=(1, 2))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, net in (("nhwc_block", Block()), ("keras_same", KerasSame())):
        torch.onnx.export(net.eval(), (torch.randn(1, 32, 32, 8),), str(out / f"{name}.onnx"), opset_version=17,
                          dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
