"""Datasets and preprocessing: Fashion-MNIST, Cluttered Fashion-MNIST, CIFAR-10, image class folders."""

from .cifar import CIFAR10, CIFAR10_CLASSES, cifar_eval_transform, cifar_train_transform
from .cluttered import (
    MULTI_OBJECT_CONFIG,
    ClutterConfig,
    ClutteredFashionMNIST,
    MultiObjectClutteredFashionMNIST,
    detection_collate,
    mask_to_rle,
    write_coco,
)
from .fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist, read_idx, write_idx
from .folder import ImageFolderDataset, class_folder_splits, image_extensions, list_class_folders, split_by_class
from .imagenet import ImageNetFolder, imagenet_eval_transform, imagenet_train_transform
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    central_crop_box,
    cifar_preprocess,
    cluttered_preprocess,
    imagenet_preprocess,
    per_image_standardize,
    to_float_image,
    torchvision_preprocess,
)

__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "ClutterConfig",
    "ClutteredFashionMNIST",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "ImageNetFolder",
    "MULTI_OBJECT_CONFIG",
    "MultiObjectClutteredFashionMNIST",
    "Preprocess",
    "central_crop_box",
    "class_folder_splits",
    "cifar_eval_transform",
    "cifar_preprocess",
    "cifar_train_transform",
    "cluttered_preprocess",
    "detection_collate",
    "find_fashion_mnist",
    "imagenet_eval_transform",
    "imagenet_preprocess",
    "imagenet_train_transform",
    "image_extensions",
    "list_class_folders",
    "load_fashion_mnist",
    "mask_to_rle",
    "per_image_standardize",
    "read_idx",
    "split_by_class",
    "to_float_image",
    "torchvision_preprocess",
    "write_coco",
    "write_idx",
]
