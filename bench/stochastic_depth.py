"""Which stochastic depth trains better on real images: transformers' (the whole hidden state dropped after the MLP's
residual add, one rate per stage) or the original CvT's (the attention and MLP branches dropped, a rate per layer)?

A small CvT on scikit-learn's handwritten digits (1,797 labelled 8x8 images, upscaled to 32 px), under each
stochastic depth, everything else equal (the same initial weights, data order and augmentation per seed):

  scratch    trained from random weights on 60% of the images, tested on 20% (the other 20% unused)
  finetune   pretrained on digits 0-4 (their 60% split), then fine-tuned, every weight, with a new head on digits 5-9
             from --shots images per class, tested on the 5-9 part of the 20% test split

Accuracy is read once, after the last epoch (no epoch picked on the test images).

    pip install scikit-learn
    python bench/stochastic_depth.py --seeds 4 --epochs 20 --threads 1 --out bench/results/stochastic-depth-digits

Writes stochastic_depth.json under --out (every run, rewritten as each ends, so a run stopped early keeps what it
measured) and, at the end, stochastic_depth.md (mean and spread per experiment).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cvt_fast
from cvt_fast.tools.reporting import cpu_description, markdown_table

MODES = ("transformers", "original")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this experiment needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    return (images - 0.5) / 0.5, torch.tensor(data.target)


def splits(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """60% train and 20% test indices, per class, the same for every seed and mode."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    train, test = [], []
    for label in range(10):
        members = order[labels[order] == label]
        n_train, n_test = round(0.6 * len(members)), round(0.2 * len(members))
        train.append(members[:n_train])
        test.append(members[n_train : n_train + n_test])
    return torch.cat(train), torch.cat(test)


def config(stochastic_depth: str, num_labels: int, drop_path_rate) -> cvt_fast.CvtConfig:
    return cvt_fast.CvtConfig(
        num_channels=1, patch_sizes=[3, 3, 3], patch_stride=[2, 2, 2], patch_padding=[1, 1, 1],
        embed_dim=[32, 64, 128], num_heads=[1, 2, 4], depth=[1, 2, 6], mlp_ratio=[4.0, 4.0, 4.0],
        drop_path_rate=list(drop_path_rate), num_labels=num_labels, stochastic_depth=stochastic_depth,
        hidden_act="quick_gelu",
    )  # fmt: skip


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random shift of up to 3 pixels each way (padding with the background)."""
    padded = F.pad(x, (3, 3, 3, 3), value=-1.0)
    dy, dx = torch.randint(0, 7, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + 32, dx : dx + 32]


def train(model, images, labels, epochs: int, seed: int, lr: float = 2e-3, batch: int = 64) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(labels) / batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    torch.manual_seed(seed)  # the drop-path masks: the same stream under either mode
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch):
            chosen = order[start : start + batch]
            loss = model(augment(images[chosen], generator), labels=labels[chosen]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def accuracy(model, images, labels) -> float:
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(part).logits.argmax(-1) for part in images.split(256)])
    return (predictions == labels).float().mean().item()


def scratch(mode, seed, images, labels, train_idx, test_idx, epochs, rates) -> float:
    torch.manual_seed(seed)
    model = cvt_fast.CvtForImageClassification(config(mode, 10, rates), backend="eager")
    train(model, images[train_idx], labels[train_idx], epochs, seed)
    return accuracy(model, images[test_idx], labels[test_idx])


def finetune(mode, seed, images, labels, train_idx, test_idx, epochs, shots, rates) -> float:
    torch.manual_seed(seed)
    base = cvt_fast.CvtForImageClassification(config(mode, 5, rates), backend="eager")
    first = train_idx[labels[train_idx] < 5]
    train(base, images[first], labels[first], epochs, seed)
    model = cvt_fast.CvtForImageClassification(config(mode, 5, rates), backend="eager")
    model.load_state_dict(base.state_dict())
    torch.manual_seed(seed + 1)
    model.classifier = cvt_fast.modeling.CvtLinear(model.classifier.in_features, 5)  # digits 5-9, as labels 0-4
    chosen = torch.cat([train_idx[labels[train_idx] == d][:shots] for d in range(5, 10)])
    train(model, images[chosen], labels[chosen] - 5, epochs, seed, lr=5e-4, batch=25)
    second = test_idx[labels[test_idx] >= 5]
    return accuracy(model, images[second], labels[second] - 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--drop-path-rate", type=float, nargs=3, default=[0.0, 0.1, 0.2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = digits()
    train_idx, test_idx = splits(labels)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)  # now: a folder that cannot be made fails before the runs
    header = (f"scikit-learn digits, {len(train_idx)} train / {len(test_idx)} test images; drop_path_rate "
              f"{args.drop_path_rate}, {args.epochs} epochs, {args.shots} shots per class in finetune; torch "
              f"{torch.__version__}, {cpu_description()}")  # fmt: skip
    runs = []
    for seed in range(args.seeds):
        for mode in MODES:
            for experiment in ("scratch", "finetune"):
                start = time.perf_counter()
                if experiment == "scratch":
                    acc = scratch(mode, seed, images, labels, train_idx, test_idx, args.epochs, args.drop_path_rate)
                else:
                    acc = finetune(mode, seed, images, labels, train_idx, test_idx, args.epochs, args.shots,
                                   args.drop_path_rate)  # fmt: skip
                runs.append({"experiment": experiment, "stochastic_depth": mode, "seed": seed, "accuracy": acc,
                             "seconds": time.perf_counter() - start})  # fmt: skip
                print(f"seed {seed} {experiment:8s} {mode:12s} accuracy {acc:.4f} "
                      f"({runs[-1]['seconds']:.0f} s)", flush=True)  # fmt: skip
                if args.out is not None:
                    record = {"args": vars(args) | {"out": str(args.out)}, "setup": header, "runs": runs}
                    (args.out / "stochastic_depth.json").write_text(json.dumps(record, indent=1) + "\n")
    rows = []
    for experiment in ("scratch", "finetune"):
        for mode in MODES:
            values = [r["accuracy"] for r in runs if r["experiment"] == experiment and r["stochastic_depth"] == mode]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append((experiment, mode, f"{statistics.mean(values):.4f}", f"{spread:.4f}", f"{min(values):.4f}",
                         f"{max(values):.4f}", len(values)))  # fmt: skip
    columns = ("experiment", "stochastic depth", "accuracy, mean", "spread (std)", "min", "max", "seeds")
    summary = f"{header}\n\n{markdown_table(columns, rows)}"
    print(summary, end="")
    if args.out is not None:
        (args.out / "stochastic_depth.md").write_text(summary)


if __name__ == "__main__":
    main()
