"""Does `--init` read the challenge's ResNet-48 as Paddle computes it? Checked against Paddle.

    bash bench/paddle_check.sh DEMO_DIR          # the wrapper: venv, both sides, the table

Two sides, two interpreters. `reference` runs in a scratch venv with paddlepaddle and numpy
only: it builds the challenge demo's own ResNet-48 (hnas/models/resnet.py of a checkout of
xiteng01/CVPR_2022_Track1_demo at DEMO_DIR; this project holds none of its code), gives every
BN layer random statistics and affine parameters, saves the state dict with `paddle.save`
(what resnet48.pdparams is), and writes the logits of a few random images in eval mode.
`compare` runs with this project: it reads that file with `supernet.read_largest_net` (no
Paddle), builds `StaticNet` of the largest arch, the supernet started from it
(`supernet.load_largest`) and `nas.py import-weights`'s torch.export program, and compares
their logits with Paddle's. Writes bench/results/paddle-check.json.
"""

import json
import sys
from datetime import date
from pathlib import Path

IMAGES = 4


def reference(demo: Path, work: Path) -> None:
    import numpy as np
    import paddle

    sys.path.insert(0, str(demo))
    from hnas.models.resnet import resnet48  # the demo's model code, from its checkout

    paddle.seed(0)
    rng = np.random.default_rng(0)
    net = resnet48()
    for layer in net.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            n = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, n).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.weight.set_value(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.1, n).astype("float32"))
    net.eval()
    images = rng.normal(0, 1, (IMAGES, 3, 224, 224)).astype("float32")
    logits = net(paddle.to_tensor(images)).numpy()
    paddle.save(net.state_dict(), str(work / "resnet48.pdparams"))
    np.save(work / "images.npy", images)
    np.save(work / "logits.npy", logits)
    (work / "paddle.json").write_text(json.dumps({"paddle": paddle.__version__}))


def compare(work: Path) -> None:
    import numpy as np
    import torch

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import supernet

    shape = supernet.NetShape()
    weights = supernet.read_largest_net(work / "resnet48.pdparams", shape)
    static = supernet.StaticNet(supernet.MAX_ARCH, shape)
    static.load_state_dict(weights)
    net = supernet.Supernet(shape)
    supernet.load_largest(net, weights)
    x = torch.from_numpy(np.load(work / "images.npy"))
    want = torch.from_numpy(np.load(work / "logits.npy"))
    program = torch.export.load(work / "import" / "net.pt2").module()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        outputs = {"StaticNet": static.eval()(x), "Supernet(MAX_ARCH)": net.eval()(x, supernet.MAX_ARCH),
                   "import-weights net.pt2": program(x * std + mean)}
    scale = float(want.abs().max())
    rows = {name: {"max_abs_diff": float((out - want).abs().max()),
                   "max_rel_diff": float((out - want).abs().max()) / scale,
                   "same_argmax": bool((out.argmax(1) == want.argmax(1)).all())}
            for name, out in outputs.items()}
    result = {"date": date.today().isoformat(), "images": IMAGES, "logit_scale": scale,
              "torch": torch.__version__, **json.loads((work / "paddle.json").read_text()),
              "rows": rows}
    print(f"{'net':<26} {'max |diff|':>12} {'relative':>10}  argmax")
    for name, r in rows.items():
        print(f"{name:<26} {r['max_abs_diff']:>12.2e} {r['max_rel_diff']:>10.2e}  "
              f"{'same' if r['same_argmax'] else 'DIFFERS'}")
    out = root / "bench" / "results" / "paddle-check.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    worst = max(r["max_rel_diff"] for r in rows.values())
    sys.exit(0 if worst < 1e-4 and all(r["same_argmax"] for r in rows.values()) else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["reference"]:
        reference(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["compare"]:
        compare(Path(sys.argv[2]))
    else:
        sys.exit("usage: paddle_check.py reference DEMO_DIR WORK | compare WORK")
