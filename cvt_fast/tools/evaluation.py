"""Accuracy on a labelled image folder (one subfolder per class, as torchvision's ImageFolder and datasets' imagefolder
lay it out), scored from the results file that `cvt-fast classify --input` writes: top-1, top-5 and per-class counts.
Images that cannot be read are counted apart, never scored as wrong or dropped silently."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import Refused
from .reporting import markdown_table


def class_folders(paths: list[str], source: str, id2label: dict[int, str]) -> dict[str, int]:
    """{class folder name: label index}: a folder named as one of the model's labels, or as a label index. Refuses an
    image outside every class folder, and a folder that names no label."""
    names = {str(name): index for index, name in id2label.items()}
    loose = [path for path in paths if len(Path(os.path.relpath(path, source)).parts) < 2]
    if loose:
        raise Refused(f"argument --input: {loose[0]} is not in a class folder; expected {source}/<class>/<image> "
                      f"for every image ({len(loose)} are not)")  # fmt: skip
    folders = sorted({Path(os.path.relpath(path, source)).parts[0] for path in paths})
    mapping, unknown = {}, []
    for folder in folders:
        if folder in names:
            mapping[folder] = names[folder]
        elif folder.isdigit() and int(folder) in id2label:
            mapping[folder] = int(folder)
        else:
            unknown.append(folder)
    if unknown:
        some = ", ".join(repr(str(n)) for n in list(id2label.values())[:5]) + (", ..." if len(id2label) > 5 else "")
        raise Refused(f"argument --input: class folder(s) {', '.join(map(repr, unknown[:5]))} name none of the "
                      f"model's {len(id2label)} labels ({some}) nor a label index "
                      f"0-{len(id2label) - 1}")  # fmt: skip
    # Two folders of one label (its name and its index) would split its images between two rows: surely a mistake.
    first = {}
    for folder, label in mapping.items():
        if label in first:
            raise Refused(f"argument --input: class folders {first[label]!r} and {folder!r} both name label {label} "
                          f"({id2label[label]!r}); expected one folder per label")  # fmt: skip
        first[label] = folder
    return mapping


@dataclass
class ClassScore:
    folder: str
    label_id: int
    images: int = 0
    unreadable: int = 0
    top1: int = 0
    top5: int = 0


@dataclass
class Evaluation:
    classes: list[ClassScore]
    labels: int  # the model's: with fewer than 5, every image is a top-5 hit, so top-5 says nothing

    # The totals are the classes' sums, never counted apart.
    @property
    def images(self) -> int:
        return sum(c.images for c in self.classes)

    @property
    def unreadable(self) -> int:
        return sum(c.unreadable for c in self.classes)

    @property
    def top1(self) -> int:
        return sum(c.top1 for c in self.classes)

    @property
    def top5(self) -> int:
        return sum(c.top5 for c in self.classes)

    @property
    def scored(self) -> int:
        return self.images - self.unreadable

    @property
    def has_top5(self) -> bool:
        return self.labels >= 5

    def lines(self) -> list[str]:
        def rate(hits: int, of: int) -> str:
            return f"{hits / of:.4f} ({hits}/{of})" if of else "-"

        top5 = rate(self.top5, self.scored) if self.has_top5 else f"- (the model has {self.labels} labels, under 5)"
        out = [f"top-1 {rate(self.top1, self.scored)}, top-5 {top5} over the readable images"
               + (f"; {self.unreadable} unreadable, not scored" if self.unreadable else "")]  # fmt: skip
        rows = [(c.folder, c.label_id, c.images, c.unreadable, c.top1,
                 f"{c.top1 / (c.images - c.unreadable):.4f}" if c.images > c.unreadable else "-")
                for c in self.classes]  # fmt: skip
        header = ("class folder", "label", "images", "unreadable", "top-1", "top-1 accuracy")
        return out + [""] + markdown_table(header, rows).splitlines()

    def as_json(self) -> dict:
        """The metrics file: the totals and each class's counts; top5 null where the model has under 5 labels."""

        def top5(hits: int) -> int | None:
            return hits if self.has_top5 else None

        return {"images": self.images, "unreadable": self.unreadable, "top1": self.top1, "top5": top5(self.top5),
                "classes": [{**asdict(c), "top5": top5(c.top5)} for c in self.classes]}  # fmt: skip


def score(results: Path, source: str, folders: dict[str, int], labels: int) -> Evaluation:
    """The results file scored against each image's class folder; `labels`: how many the model has."""
    classes = {folder: ClassScore(folder, label) for folder, label in folders.items()}
    with open(results, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            folder = Path(os.path.relpath(record["path"], source)).parts[0]
            scores = classes[folder]
            scores.images += 1
            if "error" in record:
                scores.unreadable += 1
                continue
            predicted = record["label_ids"]
            scores.top1 += predicted[:1] == [scores.label_id]
            scores.top5 += scores.label_id in predicted[:5]
    return Evaluation(sorted(classes.values(), key=lambda c: (c.label_id, c.folder)), labels)


def write_metrics(evaluation: Evaluation, path: Path) -> None:
    from ..files import replacing

    with replacing(path) as temporary:
        temporary.write_text(json.dumps(evaluation.as_json(), indent=1) + "\n", encoding="utf-8")
