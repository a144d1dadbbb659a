"""Data: images in and out, labelled image sets, probe-shapes, caption metrics. Nothing downloads."""

from probe.data.images import (
    IMAGE_SUFFIXES,
    DatasetError,
    ImageDataset,
    ImageLoadError,
    ImageTooLargeError,
    image_paths,
    images_to_tensor,
    images_to_uint8,
    load_cifar10,
    load_image_folder,
    load_images,
    load_labelled,
    max_image_pixels,
    open_rgb,
    to_rgb,
)
from probe.data.sets import ImageSet

__all__ = [
    "ImageSet", "IMAGE_SUFFIXES", "DatasetError", "ImageDataset", "ImageLoadError",
    "ImageTooLargeError", "image_paths", "images_to_tensor", "images_to_uint8", "load_cifar10",
    "load_image_folder", "load_images", "load_labelled", "max_image_pixels", "open_rgb", "to_rgb",
]
