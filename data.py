"""The datasets: Fashion-MNIST and CIFAR (found on disk or downloaded by torchvision), ImageNet.

Small datasets stay whole on the training device as uint8 and are augmented there a batch at a
time (`TensorData`); ImageNet goes through torchvision's ImageFolder and a DataLoader with
workers (`FolderData`). Both answer the same three questions: a training batch for
(key, step), the fixed calibration batches for BN, and the held-out batches.

Every training batch is a pure function of (key, step), so a resumed run, or another arch
trained with the same key, sees the same images in the same order.

This module imports nothing of the project's: `load_data` reads a preset's `dataset`,
`image_size` and `train_subset` fields and nothing else.
"""

import gzip
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
DOWNLOADS = Path("data")  # where torchvision downloads what no --data-dir holds
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_BATCH = 500  # held-out images per forward pass when measuring accuracy


class DataError(Exception):
    """A dataset that cannot be had; the message says how to get it."""


def mix_seed(*numbers: int) -> int:
    """One 63-bit seed from several integers, so every (run, phase, step) has its own stream."""
    h = 0x9E3779B97F4A7C15
    for n in numbers:
        h = (h * 0x100000001B3 ^ (n & 0xFFFFFFFFFFFFFFFF)) & 0x7FFFFFFFFFFFFFFF
    return h


# ---------------------------------------------------------------- reading the files

def read_idx_gz(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST format): byte 3 holds the number of dims, then big-endian sizes."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def fashion_mnist_folders(data_dir: Path | None) -> list[Path]:
    """Where Fashion-MNIST's four .gz files are looked for, in order: --data-dir (flat, or as
    torchvision lays them out), Debian's package, then torchvision's layout in the download
    folder (--data-dir, else data/)."""
    root = data_dir or DOWNLOADS
    folders = [data_dir, data_dir and data_dir / "FashionMNIST" / "raw", FASHION_MNIST_DIR,
               root / "FashionMNIST" / "raw"]
    return list(dict.fromkeys(f for f in folders if f))


def fashion_mnist(data_dir: Path | None, download: bool = True):
    """(train images, train labels, test images, test labels), images as N x 1 x 28 x 28 uint8,
    from the first of `fashion_mnist_folders` that holds all four files; else torchvision
    downloads them into the last one. DataError, in one line, when that fails too."""
    folders = fashion_mnist_folders(data_dir)
    for folder in folders:
        if all((folder / f).exists() for f in FASHION_MNIST_FILES):
            xs = [read_idx_gz(folder / f) for f in FASHION_MNIST_FILES]
            return xs[0][:, None], xs[1].long(), xs[2][:, None], xs[3].long()
    root = folders[-1].parent.parent
    try:
        if not download:
            raise FileNotFoundError("not downloaded")
        import torchvision
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as e:  # offline: URLError, RuntimeError or OSError
        raise DataError(f"Fashion-MNIST is in none of {', '.join(map(str, folders))} and "
                        f"torchvision could not download it into {root} ({type(e).__name__}): "
                        "pass --data-dir holding its four .gz files, or on Debian "
                        "`apt-get install -y dataset-fashion-mnist`")
    return fashion_mnist(data_dir, download=False)


def cifar(name: str, data_dir: Path | None):
    """The same four tensors for CIFAR-10/100, downloaded by torchvision where it can."""
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = data_dir or DOWNLOADS
    try:
        train, test = (cls(str(root), train=t, download=True) for t in (True, False))
    except Exception as e:  # torchvision raises URLError, RuntimeError or OSError when offline
        raise DataError(f"{name} could not be loaded from {root} or downloaded "
                        f"({type(e).__name__}); put the dataset there with --data-dir, "
                        "or use --preset tiny or small (Fashion-MNIST, offline)")

    def nchw(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    return (*nchw(train), *nchw(test))


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images at `size` px by area averaging (28 -> 14 px averages 2 x 2 blocks)."""
    if images.shape[-1] == size:
        return images
    small = F.interpolate(images.float(), size=(size, size), mode="area")
    return small.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- on-device data

def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`: on a GPU through pinned memory and without waiting (a copy
    from pageable memory would make the host wait for it); on the CPU, itself."""
    device = torch.device(device)
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


class TensorData:
    """A small dataset kept whole on the training device as uint8, augmented there in batches
    (random crop with zero padding, horizontal flip): no per-image DataLoader work."""

    def __init__(self, train_x, train_y, test_x, test_y, device, pad: int,
                 channels_last: bool | None = None):
        self.device = torch.device(device)
        self.pad = pad
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.train_x = train_x.to(self.device)
        self.train_y = train_y.to(self.device)
        self.test_x = test_x.to(self.device)
        self.test_y = test_y.to(self.device)
        pixels = train_x[:10000].float().div(255).transpose(0, 1).flatten(1)
        self.mean = pixels.mean(1).view(1, -1, 1, 1).to(self.device)
        self.std = pixels.std(1).view(1, -1, 1, 1).to(self.device)
        self.train_size = len(self.train_y)
        self._perm_key = None
        self._perm = None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_batch(self, key: int, step: int, batch_size: int, part=(0, 1)):
        """Batch `step` of the order that `key` sets; `part` = (rank, world size) takes that
        rank's contiguous share of it, augmented as the whole batch would be."""
        n = len(self.train_y)
        epoch, i = divmod(step, max(1, n // batch_size))
        if self._perm_key != (key, epoch):
            g = torch.Generator().manual_seed(mix_seed(key, epoch))
            self._perm_key = (key, epoch)
            self._perm = to_device(torch.randperm(n, generator=g), self.device)
        idx = self._perm[i * batch_size:(i + 1) * batch_size]
        g = torch.Generator().manual_seed(mix_seed(key, epoch, i, 1))
        share = batch_part(len(idx), part)
        x = self.augment(self.train_x[idx], g)[share]
        return self.normalize(x), self.train_y[idx][share]

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random crop and flip; the draws are made on the host (the same on every device, so a
        GPU run sees the images a CPU run sees) and reach the device without a sync."""
        b, c, h, w = x.shape
        dev, p = x.device, self.pad
        oy = to_device(torch.randint(0, 2 * p + 1, (b, 1), generator=g), dev)
        ox = to_device(torch.randint(0, 2 * p + 1, (b, 1), generator=g), dev)
        flip = to_device(torch.rand(b, 1, generator=g) < 0.5, dev)
        rows = oy + torch.arange(h, device=dev)
        cols = ox + torch.arange(w, device=dev)
        cols = torch.where(flip, cols.flip(1), cols)
        padded = F.pad(x, (p, p, p, p))
        images = torch.arange(b, device=dev)[:, None, None, None]
        chans = torch.arange(c, device=dev)[None, :, None, None]
        return padded[images, chans, rows[:, None, :, None], cols[:, None, None, :]]

    def calib_batches(self, n_batches: int, batch_size: int, seed: int):
        """A fixed, seeded subset of training images, un-augmented, for BN recalibration."""
        g = torch.Generator().manual_seed(mix_seed(seed, 7))
        idx = torch.randperm(len(self.train_y), generator=g)[:n_batches * batch_size]
        return [self.normalize(self.train_x[j]) for j in idx.to(self.device).split(batch_size)]

    def eval_batches(self, limit: int = 0, batch_size: int = EVAL_BATCH):
        """The first `limit` held-out images (0: all) in order, as (images, labels) batches."""
        n = len(self.test_y) if limit <= 0 else min(limit, len(self.test_y))
        spans = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        return [(self.normalize(self.test_x[span]), self.test_y[span]) for span in spans]


class SeededImages(torch.utils.data.Dataset):
    """A dataset whose random transforms draw from a seed of (key, epoch, image index): an
    image's augmentation depends neither on the worker that loads it nor on where a resumed
    run restarted its iterator, so resume is exact without checkpointing worker RNGs."""

    def __init__(self, dataset, key: int, epoch: int):
        self.dataset = dataset
        self.key = key
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.key, self.epoch, index))
            return self.dataset[index]


class FolderData:
    """ImageNet-style folders (`train/`, `val/` of class sub-folders) through torchvision's
    ImageFolder and a DataLoader with workers: too large to keep on the device."""

    def __init__(self, root: Path, image_size: int, device, workers: int = 8,
                 channels_last: bool | None = None):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise DataError(f"ImageNet folder {root} must hold train/ and val/ "
                            "with one sub-folder per class")
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.device = torch.device(device)
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.mean = torch.tensor(IMAGENET_MEAN)  # what an exported net normalizes with
        self.std = torch.tensor(IMAGENET_STD)
        self.workers = workers
        self.train = ImageFolder(str(root / "train"), T.Compose(
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
        self.plain = ImageFolder(str(root / "train"), T.Compose(
            [T.Resize(image_size * 8 // 7), T.CenterCrop(image_size), T.ToTensor(), norm]))
        self.val = ImageFolder(str(root / "val"), self.plain.transform)
        self.train_size = len(self.train)
        self._iter_key = None
        self._iter = None

    def _loader(self, dataset, indices, batch_size):
        subset = torch.utils.data.Subset(dataset, indices)
        return torch.utils.data.DataLoader(subset, batch_size, num_workers=self.workers,
                                           pin_memory=self.device.type == "cuda")

    def _to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        return x, y.to(self.device, non_blocking=True)

    def train_batch(self, key: int, step: int, batch_size: int, part=(0, 1)):
        """Batch `step`, or with `part` = (rank, world size) that rank's contiguous share of it.

        Each epoch has its own order, a permutation seeded by (key, epoch): what a
        DistributedSampler with set_epoch gives, except that the ranks' shares of one step
        make up exactly the batch one process would train on."""
        per_epoch = max(1, len(self.train) // batch_size)
        epoch, i = divmod(step, per_epoch)
        if self._iter_key != (key, epoch, i, part):  # a fresh epoch, or a resume inside one
            g = torch.Generator().manual_seed(mix_seed(key, epoch))
            order = torch.randperm(len(self.train), generator=g)[:per_epoch * batch_size]
            share = batch_part(batch_size, part)
            order = order.view(per_epoch, batch_size)[i:, share].reshape(-1)
            images = SeededImages(self.train, key, epoch)
            self._iter = iter(self._loader(images, order.tolist(), share.stop - share.start))
        self._iter_key = (key, epoch, i + 1, part)
        return self._to_device(*next(self._iter))

    def calib_batches(self, n_batches: int, batch_size: int, seed: int):
        g = torch.Generator().manual_seed(mix_seed(seed, 7))
        idx = torch.randperm(len(self.plain), generator=g)[:n_batches * batch_size].tolist()
        return [self._to_device(x, y)[0] for x, y in self._loader(self.plain, idx, batch_size)]

    def eval_batches(self, limit: int = 0, batch_size: int = EVAL_BATCH):
        n = len(self.val) if limit <= 0 else min(limit, len(self.val))
        loader = self._loader(self.val, list(range(n)), batch_size)
        return [self._to_device(x, y) for x, y in loader]


def batch_part(n: int, part: tuple[int, int]) -> slice:
    """Rank r of w's contiguous share of a batch of n; ValueError when w does not divide n."""
    r, w = part
    if n % w:
        raise ValueError(f"a batch of {n} cannot be split evenly over {w} processes")
    return slice(r * n // w, (r + 1) * n // w)


def crop_pad(dataset: str, image_size: int) -> int:
    """Zero padding of the random-crop augmentation: 4 px at CIFAR's 32, 2 px at Fashion-MNIST's
    28, scaled with the image when a preset shrinks it (1 px at 14)."""
    native, pad = (28, 2) if dataset == "fashion-mnist" else (32, 4)
    return max(1, round(pad * image_size / native))


def load_data(preset, device, data_dir: Path | None = None, seed: int = 0,
              channels_last: bool | None = None):
    """The preset's dataset on `device`; DataError with the way to get it when it is missing.
    Batches are channels_last where `channels_last` says (None: on a GPU)."""
    if preset.dataset == "imagenet":
        if data_dir is None:
            raise DataError("the paper preset needs ImageNet: "
                            "pass --data-dir holding train/ and val/")
        return FolderData(data_dir, preset.image_size, device, channels_last=channels_last)
    if preset.dataset == "fashion-mnist":
        tx, ty, vx, vy = fashion_mnist(data_dir)
    elif preset.dataset in ("cifar10", "cifar100"):
        tx, ty, vx, vy = cifar(preset.dataset, data_dir)
    else:
        raise DataError(f"unknown dataset {preset.dataset!r}")
    if preset.train_subset:
        g = torch.Generator().manual_seed(mix_seed(seed, 3))
        keep = torch.randperm(len(ty), generator=g)[:preset.train_subset]
        tx, ty = tx[keep], ty[keep]
    tx, vx = resize(tx, preset.image_size), resize(vx, preset.image_size)
    return TensorData(tx, ty, vx, vy, device, crop_pad(preset.dataset, preset.image_size),
                      channels_last)
