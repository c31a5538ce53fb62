"""Where a base model and its data come from: the offline zoo or the user's own files.

A *source* is a small dict stored in the artifact (``meta``) so that ``nnobf eval`` can rebuild
the base model and reload the data:

- model: ``{"zoo": "resnet18", "dataset": "fashion-mnist"}`` (a demo model; ``dataset`` defaults to
  the model's own) or ``{"arch": "resnet18", "weights": "w.pt", "num_classes": 10}``
  (any torchvision classification or segmentation builder, e.g. ``deeplabv3_resnet50``), or a
  diffusers pipeline directory ``{"diffusers": "path/to/stable-diffusion"}`` (loaded offline)
- data: ``{"zoo": "fashion-mnist", "image_size": 28}``, ``{"zoo": "digits", "image_size": 16}``, ``{"zoo": "digit-scenes", "image_size": 48}`` or
  ``{"calibration": "dir", "test": "dir", "image_size": 224, "mean": [...], "std": [...]}``, where
  each dir is an ImageFolder (classification) or holds ``images/`` and ``masks/`` (segmentation:
  masks are single-channel PNGs of class indices, matched to images by file stem), or the
  zoo's prompts ``{"zoo": "digit-prompts"}``
- task: how outputs are scored when the task needs more than its name, e.g. the judge of
  text-to-image ``{"judge": {"zoo": "digits-judge"}, "reference": {"zoo": "digits"}}``
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnobfuscator.core.data import Split
from nnobfuscator.core.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from nnobfuscator.core.preprocessing import class_names as core_class_names
from nnobfuscator.core.preprocessing import preprocessing as core_preprocessing
from nnobfuscator.tasks import Task


class SourceError(ValueError):
    """A model or data source is missing or malformed."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (tensors only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for bad files
        raise SourceError(f"cannot read weights from {path}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SourceError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_base_model(source: dict[str, Any], *, progress: bool = True) -> tuple[Any, dict]:
    """Build the base model a source describes; returns the model (eval mode, or a diffusers
    pipeline) and facts about it."""
    if "diffusers" in source:
        return load_pipeline_directory(source["diffusers"]), {
            "model": Path(source["diffusers"]).name
        }
    if "zoo" in source:
        from nnobfuscator.zoo import load_zoo_model

        return load_zoo_model(source["zoo"], dataset=source.get("dataset"), progress=progress)
    arch, weights = source.get("arch"), source.get("weights")
    if not arch or not weights:
        raise SourceError("model source needs 'zoo: NAME' or both 'arch' and 'weights'")
    state = load_state_dict_file(weights)
    model = build_architecture(source, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise SourceError(
            f"weights {weights} do not fit {arch} with num_classes={source.get('num_classes')}: "
            f"{str(err).splitlines()[0]}"
        ) from None
    return model.eval(), {"model": arch}


def build_architecture(source: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    """The untrained architecture a model source describes, shaped to hold ``state``.

    Raises:
        SourceError: an unknown architecture, or a pipeline source.
    """
    if "zoo" in source:
        from nnobfuscator.zoo.classifiers import build_model

        return build_model(source["zoo"], dataset=source.get("dataset"))
    arch = source.get("arch")
    if not arch:
        raise SourceError("model source needs 'zoo: NAME' or 'arch' to build an architecture")
    from torchvision import models

    options: dict[str, Any] = {"weights": None, "num_classes": int(source.get("num_classes", 1000))}
    if arch in models.list_models(module=models.segmentation):
        # Never fetch ImageNet backbone weights; build the aux head only if the state has one.
        options["weights_backbone"] = None
        options["aux_loss"] = any(k.startswith("aux_classifier.") for k in state)
        options["num_classes"] = int(source.get("num_classes", 21))
    try:
        return models.get_model(arch, **options)
    except ValueError:
        raise SourceError(
            f"unknown torchvision architecture {arch!r}; see torchvision.models.list_models()"
        ) from None


def load_pipeline_directory(path: str | Path) -> Any:
    """A diffusers pipeline saved with ``save_pretrained`` (Stable Diffusion layout), offline."""
    if not (Path(path) / "model_index.json").is_file():
        raise SourceError(
            f"{path} is not a diffusers pipeline directory (no model_index.json); save one with "
            "pipeline.save_pretrained(path)"
        )
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_task(task: str, source: dict[str, Any] | None, *, progress: bool = True) -> Task:
    """The task that scores a job's outputs (text-to-image: with its judge and real images)."""
    from nnobfuscator.tasks import TextToImageTask, get_task

    if task != TextToImageTask.name:
        return get_task(task)
    judge = (source or {}).get("judge")
    if judge != {"zoo": "digits-judge"}:
        raise SourceError(
            "text-to-image jobs need a judge: the CLI knows the zoo's {'zoo': 'digits-judge'}; "
            "for your own, calibrate in Python with task=TextToImageTask(judge=...)"
        )
    from nnobfuscator.zoo.judge import load_judge, real_digits
    from nnobfuscator.zoo.text_to_image import IMAGE_SIZE

    reference = real_digits(IMAGE_SIZE)["test"].images
    return TextToImageTask(load_judge(progress=progress), reference=reference)


def preprocessing(
    data: dict[str, Any],
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    task: str = "classification",
) -> dict[str, Any]:
    """The stored preprocessing of a model calibrated on ``data`` (see
    :func:`nnobfuscator.core.preprocessing.preprocessing`; zoo sources use the zoo's facts)."""
    from nnobfuscator.zoo.datasets import ZOO_DATASETS

    return core_preprocessing(data, ZOO_DATASETS, channels=channels, size=size, task=task)


def class_names(data: dict[str, Any]) -> list[str] | None:
    """Class names by index of a data source: the zoo dataset's, or an ImageFolder's folders."""
    from nnobfuscator.zoo.datasets import ZOO_DATASETS

    return core_class_names(data, ZOO_DATASETS)


def load_split(data: dict[str, Any], split: str) -> Split:
    """Load one split (``calibration`` or ``test``) of a data source into memory."""
    if "zoo" in data:
        from nnobfuscator.zoo import digit_scenes, digits_splits

        if data["zoo"] == "fashion-mnist":
            from nnobfuscator.zoo.fashion import fashion_mnist_splits

            return fashion_mnist_splits(int(data.get("image_size", 28)))[split]
        if data["zoo"] == "digits":
            return digits_splits(int(data.get("image_size", 16)))[split]
        if data["zoo"] == "digit-scenes":
            return digit_scenes(int(data.get("image_size", 48)))[split]
        if data["zoo"] == "python-docs":
            from nnobfuscator.zoo.language import load_smollm2_tokenizer
            from nnobfuscator.zoo.python_docs import python_docs_splits

            return python_docs_splits(
                load_smollm2_tokenizer(),
                window=int(data.get("window", 256)),
                calibration=int(data.get("passages", 24)),
                test=int(data.get("passages", 24)),
            )[split]
        if data["zoo"] == "digit-prompts":
            from nnobfuscator.zoo.text_to_image import prompt_splits

            return prompt_splits()[split]
        raise SourceError(
            f"unknown demo dataset {data['zoo']!r}; the zoo has 'fashion-mnist', 'digits', "
            "'digit-scenes' and 'digit-prompts'"
        )
    folder = data.get(split)
    if not folder:
        raise SourceError(f"data source has no '{split}' folder (an ImageFolder directory)")
    reader = mask_folder_split if (Path(folder) / "masks").is_dir() else image_folder_split
    return reader(
        folder,
        split,
        image_size=int(data.get("image_size", 224)),
        mean=data.get("mean", IMAGENET_MEAN),
        std=data.get("std", IMAGENET_STD),
        grayscale=bool(data.get("grayscale", False)),
    )


def image_folder_split(
    folder: str | Path,
    name: str,
    *,
    image_size: int,
    mean: list[float],
    std: list[float],
    grayscale: bool = False,
) -> Split:
    """An ImageFolder directory (``class_name/image.png``) as an in-memory split."""
    from torchvision import datasets, transforms

    if not Path(folder).is_dir():
        raise SourceError(f"{name} folder {folder} does not exist")
    steps: list[Any] = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if grayscale:
        steps.append(transforms.Grayscale())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as err:
        raise SourceError(
            f"{folder} is not an ImageFolder (class_name/image files): {err}"
        ) from None
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return Split(name, images, torch.tensor(dataset.targets, dtype=torch.long))


def mask_folder_split(
    folder: str | Path,
    name: str,
    *,
    image_size: int,
    mean: list[float],
    std: list[float],
    grayscale: bool = False,
) -> Split:
    """A segmentation split: ``folder/images/*`` and ``folder/masks/*.png`` matched by stem.

    Images are resized to ``image_size`` square (bilinear) and normalised; masks (class indices,
    e.g. Pascal VOC's palette PNGs; 255 = ignore) are resized with nearest neighbours.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    images_dir, masks_dir = Path(folder) / "images", Path(folder) / "masks"
    if not images_dir.is_dir():
        raise SourceError(f"{name} folder {folder} has masks/ but no images/ folder")
    masks = {path.stem: path for path in sorted(masks_dir.iterdir()) if path.is_file()}
    pairs = [(p, masks[p.stem]) for p in sorted(images_dir.iterdir()) if p.stem in masks]
    if not pairs:
        raise SourceError(
            f"{name}: no image in {images_dir} has a mask of the same name in {masks_dir}"
        )
    size = [image_size, image_size]
    images, labels = [], []
    for image_path, mask_path in pairs:
        try:
            image = Image.open(image_path).convert("L" if grayscale else "RGB")
            mask = Image.open(mask_path)
        except (OSError, UnidentifiedImageError) as err:
            raise SourceError(f"cannot read {image_path} or {mask_path}: {err}") from None
        if mask.mode not in {"L", "P", "I", "I;16"}:
            raise SourceError(
                f"mask {mask_path} is {mask.mode}; save masks as single-channel class indices"
            )
        tensor = TF.resize(TF.to_tensor(image), size, antialias=True)
        images.append(TF.normalize(tensor, mean, std))
        index = torch.as_tensor(np.array(mask), dtype=torch.long)[None]
        labels.append(TF.resize(index, size, interpolation=TF.InterpolationMode.NEAREST)[0])
    return Split(name, torch.stack(images), torch.stack(labels))
