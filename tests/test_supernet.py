import gzip
import json
import random

import pytest
import torch
from torchvision.models.resnet import BasicBlock as TVBasicBlock, ResNet

import supernet

SMALL = supernet.NetShape(image_size=16, in_channels=3, num_classes=7, width_mult=0.25, divisor=4)
MIN_CODE = ("12222" + "3" + "3333" + "00" * 3 + "3333" + "00" * 3 + "5555" + "00" * 6 + "7777"
            + "00" * 3)
LARGE_STEM = supernet.NetShape(image_size=128, in_channels=3, num_classes=5, width_mult=0.125,
                               divisor=4)


def challenge_codes():
    """The codes of the challenge's file as written there (not decoded and encoded again)."""
    raw = gzip.decompress(supernet.CHALLENGE_CANDIDATES.read_bytes())
    return [v["arch"] for v in json.loads(raw).values()]


@pytest.mark.parametrize("shape", [SMALL, LARGE_STEM], ids=["small-stem", "imagenet-stem"])
def test_supernet_subnet_equals_extracted_static_net(shape):
    torch.manual_seed(0)
    net = supernet.Supernet(shape)
    rng = random.Random(1)
    x = torch.randn(4, 3, shape.image_size, shape.image_size)
    for _ in range(3):  # give BN running statistics non-trivial values for the eval-mode check
        net.train()(x, supernet.MAX_ARCH)
    archs = [supernet.MAX_ARCH, supernet.decode(MIN_CODE)]
    archs += [supernet.sample_arch(rng) for _ in range(10)]
    for arch in archs:
        for train in (True, False):
            net.train(train)
            static = supernet.extract_subnet(net, arch)
            assert static.training == train
            with torch.no_grad():
                torch.testing.assert_close(net(x, arch), static(x), rtol=1e-5, atol=1e-5)


def test_supernet_gradients_reach_only_the_sliced_weights():
    net = supernet.Supernet(SMALL)
    arch = supernet.decode("12222" + "3" + "3333" + "00" * 3 + "1313" + "00" * 3 + "1515" + "00" * 6
                           + "7676" + "00" * 3)
    net(torch.randn(2, 3, 16, 16), arch).sum().backward()
    stage4_block0 = net.stages[3][0].conv1.weight
    mid = SMALL.ch(512, 7)
    assert stage4_block0.grad[:mid].abs().sum() > 0
    assert stage4_block0.grad[mid:].abs().sum() == 0
    assert net.stages[3][2].conv1.weight.grad is None  # depth 2: block 3 never ran


def test_round_trip_on_all_challenge_codes():
    codes = challenge_codes()
    assert len(codes) == 45000
    for code in codes:
        assert supernet.encode(supernet.decode(code)) == code
        assert supernet.encode(supernet.decode(code[1:])) == code  # the 51-character form


def test_challenge_codes_use_exactly_the_allowed_widths_per_stage():
    used = [set() for _ in range(4)]
    for code in challenge_codes()[:5000]:
        a = supernet.decode(code)
        for s in range(4):
            used[s].update(a.mids[s])
            used[s].add(a.outs[s])
    assert [tuple(sorted(u)) for u in used] == list(supernet.WIDTH_CODES)


def test_channel_table_at_width_mult_1():
    table = {1: (64, 128, 256, 512), 2: (64, 120, 240, 488), 3: (56, 112, 232, 464),
             4: (56, 112, 216, 432), 5: (48, 104, 208, 408), 6: (48, 96, 192, 384),
             7: (48, 88, 176, 360)}
    for code, row in table.items():
        assert tuple(supernet.channels(base, code) for base in supernet.BASE_WIDTHS) == row


GOOD = "1252233313000000223212122253130000000000006515000000"


def with_char(code, pos, ch):
    return code[:pos] + ch + code[pos + 1:]


@pytest.mark.parametrize("code, position, words", [
    (GOOD[:40], None, "length 40"),
    (with_char(GOOD, 7, "x"), "position 7", "not a digit"),
    (with_char(GOOD, 0, "2"), "position 0", "image-size"),
    (with_char(GOOD, 1, "1"), "position 1", "stage 1 depth 1 is outside 2..5"),
    (with_char(GOOD, 3, "9"), "position 3", "stage 3 depth 9 is outside 2..8"),
    (with_char(GOOD, 5, "4"), "position 5", "stem width code 4"),
    (with_char(GOOD, 8, "0"), "position 8", "present (depth 2) but has width code 0"),
    (with_char(GOOD, 10, "1"), "position 10", "absent (depth 2) but is '10'"),
    (with_char(GOOD, 16, "5"), "position 16", "width code 5 is not allowed in stage 2"),
    (with_char(GOOD, 43, "2"), "position 45",
     "stage 4 block 2 conv2 code 5 differs from block 1's conv2 code 2"),
    (with_char(GOOD, 45, "4"), "position 45",
     "residual tying: stage 4 block 2 conv2 code 4 differs"),
    (with_char(GOOD, 7, "2"), "position 7", "differs from the stem's code 3"),
    # 51-character form: positions as given
    (with_char(GOOD, 7, "2")[1:], "position 6", "residual tying"),
])
def test_malformed_codes_are_refused_naming_position_and_rule(code, position, words):
    with pytest.raises(ValueError) as e:
        supernet.decode(code)
    if position:
        assert str(e.value).startswith(position + ":")
    assert words in str(e.value)


def test_max_arch_matches_torchvision_resnet_params_and_flops():
    with torch.device("meta"):
        reference = ResNet(TVBasicBlock, [5, 5, 8, 5])
    assert supernet.count_flops_params(supernet.MAX_ARCH) == supernet.count_flops_params(reference)
    net = supernet.extract_subnet(supernet.Supernet(), supernet.MAX_ARCH)
    assert (sum(p.numel() for p in net.parameters())
            == sum(p.numel() for p in reference.parameters()))


def test_sampler_stays_inside_its_space_and_reaches_every_value():
    depth_ranges = ((4, 5), (3, 5), (2, 8), (2, 3))
    width_codes = ((1, 2), (1, 3), (2, 4, 5), (7,))
    rng = random.Random(0)
    seen_depths, seen_widths = [set() for _ in range(4)], [set() for _ in range(4)]
    for _ in range(3000):
        a = supernet.sample_arch(rng, depth_ranges, width_codes)
        assert supernet.decode(supernet.encode(a)) == a
        for s in range(4):
            seen_depths[s].add(a.depths[s])
            assert len(a.mids[s]) == a.depths[s]
            seen_widths[s].update(a.mids[s] + (a.outs[s],))
    assert ([tuple(sorted(d)) for d in seen_depths]
            == [tuple(range(lo, hi + 1)) for lo, hi in depth_ranges])
    assert [tuple(sorted(w)) for w in seen_widths] == list(width_codes)


def test_distance_examples_by_hand():
    big = supernet.MAX_ARCH
    assert supernet.distance(big, big) == 0
    # stage 4 one block shallower: that slot's '11' reads as 99
    shallower = supernet.decode(supernet.MAX_CODE[:4] + "4" + supernet.MAX_CODE[5:50] + "00")
    assert supernet.distance(big, shallower) == 16
    # stem 1 -> 3 moves the stem and, by tying, stage 1's five conv2 codes: 6 layers x 2
    code = list(supernet.MAX_CODE)
    code[5] = "3"
    for b in range(5):
        code[7 + 2 * b] = "3"
    assert supernet.distance(big, supernet.decode("".join(code))) == 12
    a = supernet.decode(GOOD)
    assert supernet.distance(a, big) == supernet.distance(big, a) == sum(
        abs((int(c) or 9) - 1) for c in GOOD[5:])


def test_arithmetic_sizes_equal_the_flop_counters():
    rng = random.Random(4)
    for shape in (supernet.NetShape(), supernet.NetShape(28, 1, 10, 0.125, 2),
                  supernet.NetShape(14, 1, 10, 0.125, 2), supernet.NetShape(32, 3, 10, 0.5, 4)):
        for arch in [supernet.sample_arch(rng) for _ in range(3)] + [supernet.MAX_ARCH]:
            assert supernet.size_of(arch, shape) == supernet.count_flops_params(arch, shape)


def write_pdparams(path, net: supernet.StaticNet) -> None:
    """`net` as paddle.save writes a state dict: a pickle of name -> numpy array under the
    challenge demo's names (BN statistics `_mean`, `_variance`; Linear weights [in, out]) and
    the `StructuredToParameterName@@` entry."""
    import pickle
    state = net.state_dict()
    blob = {}
    for paddle_name, ours in supernet.paddle_names(net.shape).items():
        value = state[ours].numpy()
        blob[paddle_name] = value.T.copy() if ours == "fc.weight" else value.copy()
    blob["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(blob)}
    with open(path, "wb") as f:
        pickle.dump(blob, f, protocol=4)


def test_the_challenges_pdparams_and_a_torch_file_start_the_supernet_as_that_net(tmp_path):
    shape = supernet.NetShape()  # the challenge's: full width, 224 px, 1000 classes
    torch.manual_seed(0)
    given = supernet.StaticNet(supernet.MAX_ARCH, shape)
    with torch.no_grad():  # statistics and affine parameters that a name mix-up would show
        for m in given.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.running_mean, m.bias):
                    t.normal_(0, 0.1)
                for t in (m.running_var, m.weight):
                    t.uniform_(0.5, 1.5)
    write_pdparams(tmp_path / "resnet48.pdparams", given)
    torch.save(given.state_dict(), tmp_path / "net.pt")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = given.eval()(x)
        for name in ("resnet48.pdparams", "net.pt"):
            weights = supernet.read_largest_net(tmp_path / name, shape)
            assert all(torch.equal(v, given.state_dict()[k]) for k, v in weights.items()
                       if not k.endswith("num_batches_tracked")), name
            net = supernet.Supernet(shape)
            supernet.load_largest(net, weights)
            torch.testing.assert_close(net.eval()(x, supernet.MAX_ARCH), want)
    with pytest.raises(ValueError, match=r"fc.weight is \[1000, 512\], the preset's largest "
                                         r"net needs \[10, 512\]"):
        supernet.read_largest_net(tmp_path / "resnet48.pdparams", supernet.NetShape(224, 3, 10))


def test_a_weights_file_that_names_code_is_refused_without_running_it(tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    (tmp_path / "evil.pdparams").write_bytes(pickle.dumps({"blocks.0.conv.weight": Payload()}))
    with pytest.raises(ValueError, match="names posix.system"):
        supernet.read_largest_net(tmp_path / "evil.pdparams", supernet.NetShape())
    assert not (tmp_path / "ran").exists()
    (tmp_path / "other.pdparams").write_bytes(pickle.dumps({"something": 1}))
    with pytest.raises(ValueError, match="has no weight for conv1.weight"):
        supernet.read_largest_net(tmp_path / "other.pdparams", supernet.NetShape())
