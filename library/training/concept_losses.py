"""Per-concept progress (#21 item 6): each training sample's loss by its concept (the subset it comes from) for
TensorBoard, and by image, so that the end of a run can list the images the model found hardest to fit — often the
mis-captioned or broken ones.

The losses are the ones training minimises (prior_loss_weight, masks, min-SNR and the rest applied), at the random
timesteps training drew: one image's mean over a few steps is noisy, a mean over many is telling. Each process sees
its own share of the batches; the main process logs what it saw.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

TAG = "loss/concept/"  # TensorBoard: loss/concept/<concept>, the step's mean loss over that concept's samples


def concept_labels(plan) -> dict[str, str]:
    """image path -> its concept's name: the subset folder's name ("10_sks dog"), or the metadata file's stem for
    fine-tuning subsets; "reg: " before regularization subsets; "#2" after a name two subsets share."""
    labels: dict[str, str] = {}
    names: dict[int, str] = {}
    taken: dict[str, int] = defaultdict(int)
    for dataset in plan.datasets:
        for entry in dataset.entries:
            subset = entry.subset
            if id(subset) not in names:
                source = subset.image_dir or subset.metadata_file or "images"
                name = Path(str(source)).stem if subset.image_dir is None else Path(str(source)).name
                name = f"reg: {name}" if subset.is_reg else name
                taken[name] += 1
                names[id(subset)] = name if taken[name] == 1 else f"{name} #{taken[name]}"
            labels.setdefault(str(entry.path), names[id(subset)])
    return labels


class ConceptLosses:
    """Collects (image paths, per-sample losses) of the training forwards on the device; `step_logs()` reads them
    once per optimizer step, after the step's loss has been read (so it waits for nothing)."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self._pending: list[tuple[list[str], torch.Tensor]] = []
        self.per_image: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # path -> [sum, count]

    def add(self, image_paths: list[str], losses: torch.Tensor) -> None:
        self._pending.append((list(image_paths), losses.detach().float()))

    def step_logs(self) -> dict[str, float]:
        if not self._pending:
            return {}
        paths = [path for batch_paths, _ in self._pending for path in batch_paths]
        values = torch.cat([losses.reshape(-1) for _, losses in self._pending]).tolist()
        self._pending.clear()
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for path, value in zip(paths, values):
            image = self.per_image[path]
            image[0] += value
            image[1] += 1
            concept = sums[self.labels.get(path, "other")]
            concept[0] += value
            concept[1] += 1
        return {TAG + name: total / count for name, (total, count) in sums.items()}

    def hardest(self, count: int = 5) -> list[tuple[str, float, int]]:
        """(path, mean loss, samples) of the `count` images with the highest mean loss, highest first."""
        means = [(path, total / seen, seen) for path, (total, seen) in self.per_image.items() if seen]
        return sorted(means, key=lambda item: -item[1])[:count]

    def summary_lines(self, count: int = 5) -> list[str]:
        """The end-of-run list: nothing when no more than `count` images were seen (it would list them all)."""
        if len(self.per_image) <= count:
            return []
        shown = self.hardest(count)
        lines = [f"highest mean training loss ({len(shown)} of {len(self.per_image)} images; check their captions "
                 "and pixels):"]
        lines += [f"  {mean:.4f} over {seen} sample{'s' if seen != 1 else ''}  {path}" for path, mean, seen in shown]
        return lines
