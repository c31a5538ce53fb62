"""Task adapters: how outputs are read and scored, per task."""

from nnobfuscator.tasks.base import Task, get_task, list_tasks
from nnobfuscator.tasks.classification import ClassificationTask
from nnobfuscator.tasks.segmentation import SegmentationTask
from nnobfuscator.tasks.text_generation import TextGenerationTask
from nnobfuscator.tasks.text_to_image import TextToImageTask

__all__ = [
    "ClassificationTask",
    "SegmentationTask",
    "Task",
    "TextGenerationTask",
    "TextToImageTask",
    "get_task",
    "list_tasks",
]
