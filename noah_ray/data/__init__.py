"""Data: readers for VTAB-1k / few-shot / domain-generalisation lists / image folders, the
dataset registry, paper transforms, generated tasks, DataLoaders."""

from noah_ray.data.generated import TASKS as GENERATED_TASKS
from noah_ray.data.generated import write_generated_vtab
from noah_ray.data.loader import ImageListDataset, build_dataset, build_loader, norm_for, num_classes
from noah_ray.data.registry import DatasetInfo

__all__ = ["GENERATED_TASKS", "DatasetInfo", "ImageListDataset", "build_dataset", "build_loader",
           "norm_for", "num_classes", "write_generated_vtab"]
