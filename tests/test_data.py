"""The dataset loaders of data.py on small data made here: no download, no installed dataset."""

import gzip
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
import presets


def preset(dataset, image_size=32, in_channels=3, num_classes=10, **kw):
    return presets.Preset(f"test-{dataset}", dataset, image_size, in_channels, num_classes,
                               width_mult=0.125, divisor=2, batch_size=16, epoch_scale=0.01,
                               lr_scale=1, warmup_epochs=0.1, warmup_lr=0.1, **kw)


# ---------------------------------------------------------------- CIFAR


def fake_cifar(num_classes, seed):
    """Stands in for torchvision's CIFAR class: the same attributes, seeded data, never a
    download."""

    class FakeCIFAR:
        made = []

        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            rng = np.random.default_rng([seed, int(train)])
            n = 64 if train else 40
            self.root, self.train = root, train
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = rng.integers(0, num_classes, n).tolist()
            FakeCIFAR.made.append(self)

    return FakeCIFAR


@pytest.fixture
def cifar(monkeypatch):
    fakes = {"cifar10": fake_cifar(10, 10), "cifar100": fake_cifar(100, 100)}
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fakes["cifar10"])
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fakes["cifar100"])
    return fakes


def split(fake_cls, train):
    (ds,) = [d for d in fake_cls.made if d.train == train]
    return ds


def nchw(ds):
    return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))


CIFAR_PRESET = preset("cifar10", train_subset=48, eval_subset=24)


@pytest.fixture
def cifar_data(cifar, tmp_path):
    return data.load_data(CIFAR_PRESET, "cpu", tmp_path)


def denormalize(loaded, x):
    """Back to uint8 pixels; normalization must be invertible to the integer."""
    v = (x * loaded.std + loaded.mean) * 255
    assert (v - v.round()).abs().max() < 1e-3
    return v.round().to(torch.uint8)


def augmented_views(images, pad):
    """Every crop offset and flip that TensorData.augment can draw, of every image:
    bytes -> (image index, row offset, column offset, flipped)."""
    h, w = images.shape[2:]
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    views = {}
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[:, :, oy:oy + h, ox:ox + w]
            for view in (crop, crop[..., ::-1]):  # numpy, not torch: thousands of small copies
                for j, img in enumerate(view):
                    views[img.tobytes()] = j, oy, ox, view is not crop
    return views


def augmentations(loaded, x, views):
    found = [views.get(img.numpy().tobytes()) for img in denormalize(loaded, x)]
    assert None not in found, "a batch image is no crop/flip of any training image"
    return found


def sources(loaded, x, views):
    return [j for j, *_ in augmentations(loaded, x, views)]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_is_converted_to_nchw_pixel_for_pixel(cifar, tmp_path, name):
    tx, ty, vx, vy = data.cifar(name, tmp_path)
    other = "cifar100" if name == "cifar10" else "cifar10"
    assert cifar[other].made == []
    train, test = split(cifar[name], True), split(cifar[name], False)
    assert train.root == test.root == str(tmp_path)
    for got, labels, ds in ((tx, ty, train), (vx, vy, test)):
        assert got.dtype == torch.uint8 and got.shape == (len(ds.targets), 3, 32, 32)
        assert got.is_contiguous()
        assert got[3, 2, 5, 7] == ds.data[3, 5, 7, 2]
        assert np.array_equal(got.numpy(), ds.data.transpose(0, 3, 1, 2))
        assert labels.dtype == torch.int64 and labels.tolist() == ds.targets


@pytest.mark.parametrize("error", [RuntimeError("Dataset not found or corrupted."),
                                   urllib.error.URLError("[Errno -3] Temporary failure in name "
                                                         "resolution"),
                                   OSError("Network is unreachable")])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_offline_is_a_data_error_that_says_what_to_do(monkeypatch, tmp_path, name, error):
    def offline(*args, **kwargs):
        raise error
    monkeypatch.setattr(torchvision.datasets, name.upper(), offline)
    with pytest.raises(data.DataError) as e:
        data.load_data(preset(name, num_classes=100 if name == "cifar100" else 10), "cpu", tmp_path)
    assert "--data-dir" in str(e.value) and "--preset tiny" in str(e.value)


def test_train_subset_keeps_distinct_images_with_their_labels(cifar, cifar_data):
    train, test = split(cifar["cifar10"], True), split(cifar["cifar10"], False)
    assert isinstance(cifar_data, data.TensorData)
    assert cifar_data.train_size == len(cifar_data.train_y) == len(cifar_data.train_x) == 48
    originals = {img.tobytes(): j for j, img in enumerate(nchw(train).numpy())}
    kept = [originals.get(img.tobytes()) for img in cifar_data.train_x.numpy()]
    assert None not in kept and len(set(kept)) == 48
    assert cifar_data.train_y.tolist() == [train.targets[j] for j in kept]
    assert torch.equal(cifar_data.test_x, nchw(test))
    assert cifar_data.test_y.tolist() == test.targets


def test_normalization_standardizes_each_channel(cifar_data):
    x = cifar_data.normalize(cifar_data.train_x)
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-4)


def test_train_batch_is_augmented_training_images_with_their_labels(cifar_data):
    x, y = cifar_data.train_batch(5, 0, 16)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert set(y.tolist()) <= set(cifar_data.train_y.tolist())
    found = sources(cifar_data, x, augmented_views(cifar_data.train_x, pad=4))
    assert torch.equal(cifar_data.train_y[found], y)


def test_each_epoch_shows_every_training_image_once_in_a_new_order_and_augmented(cifar_data):
    views = augmented_views(cifar_data.train_x, pad=4)
    epochs = [[a for step in range(3 * e, 3 * e + 3)
               for a in augmentations(cifar_data, cifar_data.train_batch(5, step, 16)[0], views)]
              for e in range(2)]
    order = [[j for j, *_ in epoch] for epoch in epochs]
    assert sorted(order[0]) == sorted(order[1]) == list(range(48))
    assert order[0] != order[1]
    drawn = epochs[0] + epochs[1]
    assert {flipped for *_, flipped in drawn} == {False, True}
    assert len({(oy, ox) for _, oy, ox, _ in drawn}) > 20


def test_a_batch_is_a_function_of_key_and_step(cifar, cifar_data, tmp_path):
    x, y = cifar_data.train_batch(5, 1, 16)
    x2, y2 = cifar_data.train_batch(5, 1, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    resumed = data.load_data(CIFAR_PRESET, "cpu", tmp_path)  # a new process after --resume
    x3, y3 = resumed.train_batch(5, 1, 16)
    assert torch.equal(x, x3) and torch.equal(y, y3)
    assert not torch.equal(x, cifar_data.train_batch(5, 2, 16)[0])
    assert not torch.equal(x, cifar_data.train_batch(6, 1, 16)[0])
    # the same place in the next epoch
    assert not torch.equal(x, cifar_data.train_batch(5, 4, 16)[0])


def test_eval_batches_cover_eval_subset_in_order(cifar, cifar_data):
    test = split(cifar["cifar10"], False)
    batches = cifar_data.eval_batches(CIFAR_PRESET.eval_subset, 8)
    assert [len(y) for _, y in batches] == [8, 8, 8]
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert y.tolist() == test.targets[:24]
    assert torch.equal(denormalize(cifar_data, x), nchw(test)[:24])
    assert [len(y) for _, y in cifar_data.eval_batches(0, 16)] == [16, 16, 8]


def test_eval_batches_stop_at_a_limit_that_is_no_multiple_of_the_batch(cifar_data):
    assert [len(y) for _, y in cifar_data.eval_batches(24, 10)] == [10, 10, 4]


def test_calib_batches_are_seeded_unaugmented_training_images(cifar_data):
    batches = cifar_data.calib_batches(2, 8, seed=0)
    assert [b.shape for b in batches] == [(8, 3, 32, 32)] * 2
    originals = {img.tobytes(): j for j, img in enumerate(cifar_data.train_x.numpy())}
    found = [originals.get(img.numpy().tobytes())
             for b in batches for img in denormalize(cifar_data, b)]
    assert None not in found and len(set(found)) == 16
    assert all(torch.equal(a, b) for a, b in zip(batches, cifar_data.calib_batches(2, 8, seed=0)))


# ---------------------------------------------------------------- ImageNet-style folders

# Not in sorted order: ImageFolder numbers classes by sorted name, and so must every label here.
CLASSES = ("cat", "ant", "bee")
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/ and val/ of small PNGs of odd sizes. Each image is one random colour, distinct from
    all others, because a uniform image stays uniform through crops and resizes: a batch image
    then tells which file it came from."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    n = len(CLASSES) * (TRAIN_PER_CLASS + VAL_PER_CLASS)
    palette = iter(rng.choice(16 ** 3, n, replace=False))
    expected = {"train": [], "val": []}
    for part, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, cls in enumerate(sorted(CLASSES)):
            (root / part / cls).mkdir(parents=True)
            for k in range(per_class):
                code = int(next(palette))
                color = (code // 256 * 16 + 8, code // 16 % 16 * 16 + 8, code % 16 * 16 + 8)
                size = (20 + 3 * k, 17 + 5 * label)
                Image.new("RGB", size, color).save(root / part / cls / f"{k}.png")
                expected[part].append((color, label))
    return root, expected


def folder_sources(x, expected):
    """Index into `expected` of the file each image of the batch was made from."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (x * std + mean) * 255
    assert (rgb - rgb.mean((2, 3), keepdim=True)).abs().max() < 0.5, (
        "not a uniform image: wrong normalization?")
    colors = torch.tensor([c for c, _ in expected], dtype=torch.float32)
    dist = (rgb.mean((2, 3))[:, None, :] - colors[None]).abs().amax(2)
    assert (dist.min(1).values < 0.5).all(), "a batch image matches no file"
    return dist.argmin(1).tolist()


def count_loaders(monkeypatch, loaded):
    made = []
    make = loaded._loader

    def counting(*args):
        made.append(args)
        return make(*args)
    monkeypatch.setattr(loaded, "_loader", counting)
    return made


def test_folder_train_batch(folders):
    root, expected = folders
    loaded = data.FolderData(root, 16, "cpu", workers=0)
    assert loaded.train_size == len(CLASSES) * TRAIN_PER_CLASS
    x, y = loaded.train_batch(1, 0, 4)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    assert y.tolist() == [expected["train"][j][1] for j in folder_sources(x, expected["train"])]


def test_folder_steps_of_an_epoch_continue_one_iterator(folders, monkeypatch):
    root, expected = folders
    loaded = data.FolderData(root, 16, "cpu", workers=0)
    loaders = count_loaders(monkeypatch, loaded)
    seen = []
    for step in range(3):  # 12 images, 4 a batch: one epoch
        x, y = loaded.train_batch(1, step, 4)
        found = folder_sources(x, expected["train"])
        assert y.tolist() == [expected["train"][j][1] for j in found]
        seen += found
    assert len(loaders) == 1
    assert sorted(seen) == list(range(12))
    loaded.train_batch(1, 3, 4)
    assert len(loaders) == 2


def test_folder_shares_of_a_batch_make_up_the_whole_batch_in_every_epoch(folders):
    """What each of 2 ranks takes is its half of the one-process batch, with the same images
    and augmentation, and the order changes from epoch to epoch."""
    root, expected = folders
    whole, ranks = (data.FolderData(root, 16, "cpu", workers=0) for _ in range(2))
    for step in (0, 1, 3):  # 3 batches of 4 an epoch: step 3 is the second epoch's first
        x, y = whole.train_batch(1, step, 4)
        parts = [ranks.train_batch(1, step, 4, (r, 2)) for r in (0, 1)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    first, second = (folder_sources(whole.train_batch(1, s, 4)[0], expected["train"])
                     for s in (0, 3))
    assert first != second
    with pytest.raises(ValueError, match="cannot be split evenly over 3"):
        ranks.train_batch(1, 0, 4, (0, 3))


def test_tensor_shares_of_a_batch_make_up_the_whole_batch(cifar_data):
    x, y = cifar_data.train_batch(5, 2, 16)
    parts = [cifar_data.train_batch(5, 2, 16, (r, 4)) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_folder_resume_in_the_middle_of_an_epoch(folders):
    root, expected = folders
    run = data.FolderData(root, 16, "cpu", workers=0)
    # 12 images, 5 a batch: 2 full batches an epoch, so step 3 is the second batch of the second
    # epoch
    straight = [folder_sources(run.train_batch(2, step, 5)[0], expected["train"])
                for step in range(4)]
    assert len(set(straight[0] + straight[1])) == 10
    resumed = data.FolderData(root, 16, "cpu", workers=0)
    x, y = resumed.train_batch(2, 3, 5)
    assert x.shape == (5, 3, 16, 16) and len(y) == 5
    assert folder_sources(x, expected["train"]) == straight[3]


def test_an_images_augmentation_depends_only_on_key_epoch_and_index():
    class Noisy(torch.utils.data.Dataset):  # a "transform" that is all randomness
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.rand(3)

    images = data.SeededImages(Noisy(), key=1, epoch=0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [images[i] for i in range(10)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(5)  # another global state and another order, as after a resume or in a worker
    assert torch.equal(images[3], first[3]) and torch.equal(images[1], first[1])
    assert not torch.equal(first[3], first[4])
    assert not torch.equal(data.SeededImages(Noisy(), key=1, epoch=1)[3], first[3])


def test_folder_calib_batches(folders):
    root, expected = folders
    loaded = data.FolderData(root, 16, "cpu", workers=0)
    batches = loaded.calib_batches(2, 3, seed=0)
    assert [b.shape for b in batches] == [(3, 3, 16, 16)] * 2
    assert all(b.dtype == torch.float32 for b in batches)
    found = [j for b in batches for j in folder_sources(b, expected["train"])]
    assert len(set(found)) == 6
    assert all(torch.equal(a, b) for a, b in zip(batches, loaded.calib_batches(2, 3, seed=0)))


def test_folder_eval_batches_are_all_val_images_in_order(folders):
    root, expected = folders
    loaded = data.FolderData(root, 16, "cpu", workers=0)
    batches = loaded.eval_batches(0, 4)
    assert [len(y) for _, y in batches] == [4, 2]
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert x.shape == (6, 3, 16, 16) and y.dtype == torch.int64
    assert y.tolist() == [label for _, label in expected["val"]]
    assert folder_sources(x, expected["val"]) == list(range(6))
    assert [len(y) for _, y in loaded.eval_batches(5, 2)] == [2, 2, 1]


# load_data's default of 8 workers is more than a 2-core machine suggests; the loader's choice,
# kept here.
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_load_data_imagenet_with_its_default_workers(folders):
    root, expected = folders
    loaded = data.load_data(preset("imagenet", image_size=16, num_classes=3), "cpu", root)
    assert isinstance(loaded, data.FolderData) and loaded.train_size == 12
    (x, y), = loaded.eval_batches(0, 8)
    assert y.tolist() == [label for _, label in expected["val"]]
    assert folder_sources(x, expected["val"]) == list(range(6))


def test_imagenet_without_data_dir_says_to_pass_it():
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_data(preset("imagenet", image_size=16, num_classes=3), "cpu", None)


def test_imagenet_folder_without_val_is_a_data_error(tmp_path):
    (tmp_path / "train" / "ant").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "ant" / "0.png")
    with pytest.raises(data.DataError, match="val/"):
        data.FolderData(tmp_path, 16, "cpu", workers=0)
    with pytest.raises(data.DataError, match="val/"):
        data.load_data(preset("imagenet", image_size=16, num_classes=1), "cpu", tmp_path)


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(data.DataError, match="svhn"):
        data.load_data(preset("svhn"), "cpu", None)


# ---------------------------------------------------------------- Fashion-MNIST (IDX)


def write_idx_gz(path, magic, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape)
                + array.astype(np.uint8).tobytes())


def test_read_idx_gz_images_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    # one size above 255, and no two alike: a little-endian or transposed reading cannot pass
    images = rng.integers(0, 256, (3, 7, 260), dtype=np.uint8)
    labels = rng.integers(0, 10, 300, dtype=np.uint8)
    write_idx_gz(tmp_path / "images.gz", 0x00000803, images)
    write_idx_gz(tmp_path / "labels.gz", 0x00000801, labels)
    got_images = data.read_idx_gz(tmp_path / "images.gz")
    got_labels = data.read_idx_gz(tmp_path / "labels.gz")
    assert got_images.dtype == torch.uint8 and got_images.shape == (3, 7, 260)
    assert np.array_equal(got_images.numpy(), images)
    assert got_labels.shape == (300,) and np.array_equal(got_labels.numpy(), labels)


@pytest.fixture
def fashion(tmp_path):
    """The four IDX files of a small Fashion-MNIST: (train images, labels, test images, labels)."""
    rng = np.random.default_rng(2)
    arrays = (rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, 40, dtype=np.uint8),
              rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, 20, dtype=np.uint8))

    def write(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in zip(data.FASHION_MNIST_FILES, arrays):
            write_idx_gz(folder / name, 0x00000800 | array.ndim, array)
        return folder
    return arrays, write


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Debian's folder out of reach, torchvision's download folder empty, and no network: a
    download fails at once."""
    empty = tmp_path / "system-fashion-mnist"
    empty.mkdir()
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", empty)
    monkeypatch.setattr(data, "DOWNLOADS", tmp_path / "downloads")

    def offline(root, train, download):
        raise OSError("no network here")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    return empty


def assert_fashion(got, arrays):
    tx, ty, vx, vy = got
    assert tx.shape == (40, 1, 28, 28) and vx.shape == (20, 1, 28, 28) and tx.dtype == torch.uint8
    assert ty.dtype == vy.dtype == torch.int64
    for g, a in zip((tx[:, 0], ty, vx[:, 0], vy), arrays):
        assert np.array_equal(g.numpy(), a)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_data_dir(fashion, no_system_fashion, tmp_path, layout):
    arrays, write = fashion
    data_dir = tmp_path / "data"
    write(data_dir if layout == "flat" else data_dir / "FashionMNIST" / "raw")
    assert_fashion(data.fashion_mnist(data_dir), arrays)


def test_fashion_mnist_from_the_system_folder(fashion, no_system_fashion):
    arrays, write = fashion
    write(no_system_fashion)
    assert_fashion(data.fashion_mnist(None), arrays)


@pytest.mark.parametrize("data_dir", [None, "empty"])
def test_fashion_mnist_missing_says_where_it_looked_in_one_line(no_system_fashion, tmp_path,
                                                               data_dir):
    with pytest.raises(data.DataError, match="could not download it") as e:
        data.fashion_mnist(data_dir and tmp_path)
    message = str(e.value)
    assert "--data-dir" in message and "apt-get" in message and "\n" not in message
    assert str(no_system_fashion) in message and "OSError" in message


def test_fashion_mnist_sources_are_taken_in_order_and_downloads_land_in_data(
        fashion, no_system_fashion, tmp_path, monkeypatch):
    arrays, write = fashion
    other = tuple(a[::-1].copy() for a in arrays)  # another dataset, to tell the sources apart
    downloads = write(data.DOWNLOADS / "FashionMNIST" / "raw")
    # torchvision's layout under data/ is found without --data-dir
    assert_fashion(data.fashion_mnist(None), arrays)
    # Debian's folder comes before it, --data-dir before both
    for name, array in zip(data.FASHION_MNIST_FILES, other):
        write_idx_gz(no_system_fashion / name, 0x00000800 | array.ndim, array)
    assert_fashion(data.fashion_mnist(None), other)
    assert_fashion(data.fashion_mnist(write(tmp_path / "mine")), arrays)
    # nothing anywhere: torchvision downloads into the download folder, which is then read
    for folder in (downloads, no_system_fashion):
        for name in data.FASHION_MNIST_FILES:
            (folder / name).unlink()
    roots = []

    def download(root, train, download):
        roots.append(root)
        write(Path(root) / "FashionMNIST" / "raw")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", download)
    assert_fashion(data.fashion_mnist(None), arrays)
    assert roots == [str(data.DOWNLOADS)]


def test_load_data_fashion_mnist(fashion, no_system_fashion, tmp_path):
    arrays, write = fashion
    p = preset("fashion-mnist", 28, 1, 10, train_subset=32, eval_subset=16)
    loaded = data.load_data(p, "cpu", write(tmp_path / "data"))
    assert isinstance(loaded, data.TensorData) and loaded.train_size == 32 and loaded.pad == 2
    x, y = loaded.train_batch(0, 0, 16)
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert set(y.tolist()) <= set(arrays[1].tolist())
    found = sources(loaded, x, augmented_views(loaded.train_x, pad=2))
    assert torch.equal(loaded.train_y[found], y)
    (ex, ey), = loaded.eval_batches(p.eval_subset, 16)
    assert ey.tolist() == arrays[3][:16].tolist()
    assert np.array_equal(denormalize(loaded, ex)[:, 0].numpy(), arrays[2][:16])
