"""Data: images in and out, labelled image sets, probe-shapes, caption metrics. Nothing downloads."""

from probe.data.images import (
    IMAGE_SUFFIXES,
    ImageDataset,
    ImageLoadError,
    image_paths,
    images_to_tensor,
    images_to_uint8,
    load_cifar10,
    load_image_folder,
    load_images,
    load_labelled,
    open_rgb,
    to_rgb,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "ImageLoadError",
    "image_paths",
    "images_to_tensor",
    "images_to_uint8",
    "load_cifar10",
    "load_image_folder",
    "load_images",
    "load_labelled",
    "open_rgb",
    "to_rgb",
]
