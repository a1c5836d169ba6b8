"""ImageNet (ILSVRC-2012) in ImageFolder layout, for the paper's "imagenet small" MDEQ config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from deqlab.data.base import PathLike, Split, TorchvisionDataModule, normalize_transform

__all__ = ["ImageNetDataModule", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_NUM_CLASSES = 1000


class ImageNetDataModule(TorchvisionDataModule):
    """ImageNet from class folders through ``torchvision.datasets.ImageFolder``.

    On disk: ``<data_dir>/train/<class>/*.JPEG`` and ``<data_dir>/val/<class>/*.JPEG`` (the official
    validation images sorted into the same class folders as train, e.g. with the widely used
    ``valprep.sh``). Labels are the indices of the sorted class-folder names. ``val/`` is the *test*
    set (ImageNet's test labels are not public); validation is a seeded ``val_fraction`` of ``train/``.
    ``train/`` and ``val/`` must contain the same class folders, otherwise labels would silently
    disagree, so a mismatch raises ``ValueError``.

    Args:
        data_dir: the ImageNet root holding ``train/`` and ``val/``. Default ``"data/imagenet"``: a
            sub-folder of the shared ``data`` root, since ImageFolder's ``train/`` and ``val/`` would
            otherwise sit beside the other datasets' folders.
        num_workers: loader worker processes. Default 8: JPEG decoding needs several to keep a GPU busy.
        val_fraction: fraction of ``train/`` held out for validation. Default 0.01 (~12.8k images):
            enough to track accuracy, while a tenth would take 128k images from training.
        augment: the standard training augmentation, RandomResizedCrop(image_size) + horizontal
            flip; without it training images get the evaluation transform. Default ``True``, as in the
            paper's ImageNet protocol.
        image_size: side of the square network input; evaluation resizes the shorter side to
            ``round(image_size / 0.875)`` (256 for 224) and centre-crops. Default 224, the paper's.
        **kwargs: the other loader options of [`BaseDataModule`][deqlab.data.BaseDataModule] (the paper's
            batch size is 64). ``download=True`` raises: ImageNet cannot be downloaded automatically
            (registration and licence at image-net.org).

    Normalisation: the standard ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).

    Raises:
        ValueError: when ``download=True`` (ImageNet cannot be fetched automatically), ``image_size`` < 1,
            or for an invalid loader option.

    Examples:
        >>> from deqlab.data import ImageNetDataModule
        >>> dm = ImageNetDataModule("/nonexistent/imagenet", image_size=160)
        >>> dm.num_classes, dm.input_shape, dm.resize_size  # 1000 until class folders can be counted
        (1000, (3, 160, 160), 183)
        >>> ImageNetDataModule(download=True)
        Traceback (most recent call last):
        ...
        ValueError: ImageNet cannot be downloaded automatically (it needs registration at image-net.org). ...
    """

    downloadable = False

    name = "ImageNet"

    def __init__(
        self,
        data_dir: PathLike = "data/imagenet",
        *,
        num_workers: int = 8,
        val_fraction: float = 0.01,
        augment: bool = True,
        image_size: int = 224,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("download"):
            raise ValueError(
                "ImageNet cannot be downloaded automatically (it needs registration at image-net.org). "
                "Download ILSVRC-2012 yourself, arrange it as <data_dir>/train/<class>/*.JPEG and "
                "<data_dir>/val/<class>/*.JPEG, and pass download=False."
            )
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        super().__init__(data_dir, num_workers=num_workers, val_fraction=val_fraction, augment=augment, **kwargs)
        self.save_hyperparameters()
        self.image_size = image_size
        self.resize_size = int(round(image_size / 0.875))
        self.input_shape: tuple[int, ...] = (3, image_size, image_size)

    @property
    def train_dir(self) -> Path:
        return self.data_dir / "train"

    @property
    def val_dir(self) -> Path:
        return self.data_dir / "val"

    def _train_classes(self) -> Optional[list[str]]:
        """Sorted class-folder names of ``train/``, or ``None`` when it is absent or empty."""
        try:
            return find_classes(self.train_dir)[0]
        except (FileNotFoundError, NotADirectoryError):
            return None

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Class folders in ``train/`` (or ``val/``); 1000 while no data is there to count."""
        for folder in (self.train_dir, self.val_dir):
            try:
                return len(find_classes(folder)[0])
            except (FileNotFoundError, NotADirectoryError):
                continue
        return _DEFAULT_NUM_CLASSES

    def expected_paths(self, split: Split) -> list[Path]:
        return [self.train_dir if split == "train" else self.val_dir]

    def layout_hint(self) -> str:
        return (
            f"Expected ImageFolder layout: {self.train_dir}/<class>/*.JPEG for training and "
            f"{self.val_dir}/<class>/*.JPEG (same class folders) for testing."
        )

    def download_data(self) -> None:  # pragma: no cover - __init__ rejects download=True
        raise RuntimeError("ImageNet cannot be downloaded automatically")

    def load_split(self, split: Split, transform: Optional[Callable]) -> Dataset:
        folder = self.train_dir if split == "train" else self.val_dir
        try:
            dataset = ImageFolder(folder, transform=transform)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}. {self.layout_hint()}") from err
        reference = self._train_classes()
        if split == "test" and reference is not None and dataset.classes != reference:
            only_train = sorted(set(reference) - set(dataset.classes))[:5]
            only_val = sorted(set(dataset.classes) - set(reference))[:5]
            raise ValueError(
                f"class folders differ between {self.train_dir} ({len(reference)}) and {folder} "
                f"({len(dataset.classes)}), so label indices would not match; e.g. only in train: "
                f"{only_train}, only in val: {only_val}"
            )
        return dataset

    def train_transform(self) -> Callable:
        if not self.augment:
            return self.eval_transform()
        augment = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        return normalize_transform(IMAGENET_MEAN, IMAGENET_STD, augment=augment)

    def eval_transform(self) -> Callable:
        augment = [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.image_size)]
        return normalize_transform(IMAGENET_MEAN, IMAGENET_STD, augment=augment)
