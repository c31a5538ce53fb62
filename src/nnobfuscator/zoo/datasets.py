"""Facts about the zoo's offline datasets that a served model needs: class names, normalisation."""

from __future__ import annotations

from nnobfuscator.core.preprocessing import DatasetFacts as ZooDataset
from nnobfuscator.zoo import digits, fashion, scenes

ZOO_DATASETS: dict[str, ZooDataset] = {
    "fashion-mnist": ZooDataset(tuple(fashion.FASHION_CLASSES), fashion._MEAN, fashion._STD),
    "digits": ZooDataset(tuple(digits.DIGITS_CLASSES), digits._MEAN, digits._STD),
    "digit-scenes": ZooDataset(tuple(scenes.SCENE_CLASSES), scenes._MEAN, scenes._STD),
}
