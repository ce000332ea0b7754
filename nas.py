"""Rank-consistent one-shot NAS: the command line.

    python nas.py arch CODE          decode an arch code, with FLOPs and parameters
    python nas.py sample --n N       sample valid arch codes from the full space
"""

import json
import random
import sys

import typer

import supernet as sn

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Rank-consistent one-shot NAS on the CVPR 2022 ResNet-48 search space.")

IMAGE_SHAPES = {224: sn.NetShape(224, 3, 1000), 32: sn.NetShape(32, 3, 10), 28: sn.NetShape(28, 1, 10)}


def die(message: str, code: int = 2):
    """Bad input: one line on stderr and a non-zero exit, never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def parse_arch(code: str) -> sn.Arch:
    try:
        return sn.decode(code)
    except ValueError as e:
        die(f"bad arch code {code!r}: {e}")


@app.command()
def arch(code: str = typer.Argument(..., help="52-character arch code (or 51 without the leading '1')"),
         image_size: int = typer.Option(224, help="input size: 224 (ImageNet), 32 (CIFAR) or 28 (Fashion-MNIST)"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Decode an arch code: depths, channels of every layer, FLOPs and parameters."""
    a = parse_arch(code)
    if image_size not in IMAGE_SHAPES:
        die(f"--image-size must be one of {sorted(IMAGE_SHAPES)}, got {image_size}")
    shape = IMAGE_SHAPES[image_size]
    flops, params = sn.count_flops_params(a, image_size, shape)
    stem, plan = sn.arch_channels(a, shape)
    blocks, i = [], 0
    for s in range(4):
        for b in range(a.depths[s]):
            cin, mid, cout, stride = plan[i]
            blocks.append({"stage": s + 1, "block": b + 1, "in": cin, "mid": mid, "out": cout, "stride": stride})
            i += 1
    if as_json:
        typer.echo(json.dumps({"code": sn.encode(a), "depths": list(a.depths), "stem": stem, "blocks": blocks,
                               "flops": flops, "params": params, "image_size": image_size}))
        return
    typer.echo(f"code    {sn.encode(a)}")
    typer.echo(f"depths  {' '.join(map(str, a.depths))}   stem {stem} channels")
    for blk in blocks:
        typer.echo(f"  stage {blk['stage']} block {blk['block']}: {blk['in']:>4} -> {blk['mid']:>4} -> {blk['out']:>4}"
                   f"  stride {blk['stride']}")
    typer.echo(f"FLOPs   {flops / 1e9:.3f} G at {image_size} px   params {params / 1e6:.3f} M")


@app.command()
def sample(n: int = typer.Option(10, "--n", min=1, help="how many codes"),
           seed: int = typer.Option(0, help="random seed")):
    """Print N arch codes sampled uniformly from the full search space."""
    rng = random.Random(seed)
    for _ in range(n):
        typer.echo(sn.encode(sn.sample_arch(rng)))


if __name__ == "__main__":
    sys.exit(app())
