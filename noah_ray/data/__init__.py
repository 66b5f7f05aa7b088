"""Data: readers for VTAB-1k / few-shot / domain-generalisation lists / image folders (local or
``s3://``), paper transforms, generated tasks, DataLoaders."""

from noah_ray.data.generated import TASKS as GENERATED_TASKS
from noah_ray.data.generated import write_generated_vtab
from noah_ray.data.loader import ImageListDataset, build_dataset, build_loader, norm_for, num_classes, registry_entry
from noah_ray.data.readers import dataset_dir, read_list, read_split
from noah_ray.data.transforms import ImageTransform, build_transform

__all__ = ["GENERATED_TASKS", "ImageListDataset", "ImageTransform", "build_dataset",
           "build_loader", "build_transform", "dataset_dir", "norm_for", "num_classes", "read_list",
           "read_split", "registry_entry", "write_generated_vtab"]
