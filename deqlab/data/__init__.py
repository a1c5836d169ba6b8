"""LightningDataModules for deqlab's experiments (torchvision underneath).

``DigitsDataModule`` needs no files (scikit-learn bundles the data) and is the default for demos
and tests; MNIST, SVHN, CIFAR-10 and ImageNet read the official files from ``data_dir`` and
download them only when asked (``download=True``). Every module splits its training data into
train/val with a seed, identically on every DDP rank, and exposes ``num_classes`` and
``input_shape`` so models can be sized before the data is loaded.
"""

from deqlab.data.base import (
    BaseDataModule,
    EpochSeededSampler,
    ResumableDataLoader,
    TorchvisionDataModule,
    TransformedSubset,
    split_indices,
    split_lengths,
)
from deqlab.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from deqlab.data.digits import DigitsDataModule
from deqlab.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule
from deqlab.data.mnist import MNIST_MEAN, MNIST_STD, MNISTDataModule, load_mnist_tensors
from deqlab.data.svhn import SVHN_MEAN, SVHN_STD, SVHNDataModule

__all__ = [
    "BaseDataModule",
    "EpochSeededSampler",
    "ResumableDataLoader",
    "CIFAR10DataModule",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DigitsDataModule",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetDataModule",
    "MNISTDataModule",
    "MNIST_MEAN",
    "MNIST_STD",
    "SVHNDataModule",
    "SVHN_MEAN",
    "SVHN_STD",
    "TorchvisionDataModule",
    "TransformedSubset",
    "load_mnist_tensors",
    "split_indices",
    "split_lengths",
]
