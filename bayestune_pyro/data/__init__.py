"""Tasks, batches and metrics for fine-tuning sequence and image classifiers."""

from .images import ImageInput
from .loaders import infinite_batches, make_loader
from .metrics import compute_metrics
from .tasks import TASKS, Example, TaskData, TaskSpec, load_task, task_names

__all__ = ["TASKS", "Example", "ImageInput", "TaskData", "TaskSpec", "compute_metrics", "infinite_batches",
           "load_task", "make_loader", "task_names"]
