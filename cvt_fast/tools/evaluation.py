"""Accuracy on a labelled image folder (one subfolder per class, as torchvision's ImageFolder and datasets' imagefolder
lay it out), scored from the results file that `cvt-fast classify --input` writes: top-1, top-5 and per-class counts.
Images that cannot be read are counted apart, never scored as wrong or dropped silently."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import Refused


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
    images: int = 0
    unreadable: int = 0
    top1: int = 0
    top5: int = 0
    top_k: int = 0  # how many labels each result holds: top-5 needs 5
    classes: list[ClassScore] = field(default_factory=list)

    @property
    def scored(self) -> int:
        return self.images - self.unreadable

    def lines(self) -> list[str]:
        def rate(hits: int, of: int) -> str:
            return f"{hits / of:.4f} ({hits}/{of})" if of else "-"

        top5 = rate(self.top5, self.scored) if self.top_k >= 5 else f"- (the results hold {self.top_k} labels)"
        out = [f"top-1 {rate(self.top1, self.scored)}, top-5 {top5} over the readable images"
               + (f"; {self.unreadable} unreadable, not scored" if self.unreadable else "")]  # fmt: skip
        out += [
            "",
            "| class folder | label | images | unreadable | top-1 | top-1 accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.classes:
            accuracy = f"{c.top1 / (c.images - c.unreadable):.4f}" if c.images > c.unreadable else "-"
            out.append(f"| {c.folder} | {c.label_id} | {c.images} | {c.unreadable} | {c.top1} | {accuracy} |")
        return out


def score(results: Path, source: str, folders: dict[str, int]) -> Evaluation:
    classes = {folder: ClassScore(folder, label) for folder, label in folders.items()}
    evaluation = Evaluation()
    with open(results, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            folder = Path(os.path.relpath(record["path"], source)).parts[0]
            scores = classes[folder]
            scores.images += 1
            evaluation.images += 1
            if "error" in record:
                scores.unreadable += 1
                evaluation.unreadable += 1
                continue
            predicted = record["label_ids"]
            evaluation.top_k = max(evaluation.top_k, len(predicted))
            hit1, hit5 = predicted[:1] == [scores.label_id], scores.label_id in predicted[:5]
            scores.top1 += hit1
            scores.top5 += hit5
            evaluation.top1 += hit1
            evaluation.top5 += hit5
    evaluation.classes = sorted(classes.values(), key=lambda c: (c.label_id, c.folder))
    return evaluation


def write_metrics(evaluation: Evaluation, path: Path) -> None:
    from ..files import replacing

    with replacing(path) as temporary:
        temporary.write_text(json.dumps(asdict(evaluation), indent=1) + "\n", encoding="utf-8")
