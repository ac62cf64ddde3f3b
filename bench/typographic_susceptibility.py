"""Does the embedded model read text? Typographic susceptibility of lorekit-tiny on the digits test split.

For each way of writing a wrong class name onto the 32×32 digits (lorekit.typographic), the zero-shot
accuracy on the attacked images and the fraction classified as the written class (`written`). A control
writes a string that is no class name, in the same style and place, and counts the predictions that
land on the class which would have been written: the part of `written` that occlusion alone explains.
A preference-optimisation demonstration on this model means something only where `written` clearly
exceeds its control. Writes bench/results/typographic_susceptibility.json.

    LOREKIT_CACHE=$PWD/.cache .venv/bin/python bench/typographic_susceptibility.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorekit import suite  # noqa: E402
from lorekit.config import TrainConfig  # noqa: E402
from lorekit.render import PALETTE  # noqa: E402
from lorekit.robustness import machine  # noqa: E402
from lorekit.typographic import TypoStyle, draw_attack, sample_seeds, wrong_labels  # noqa: E402
from lorekit.workbench import setup  # noqa: E402

BRIGHT = tuple(name for i, name in enumerate(PALETTE) if i in suite.BRIGHT)  # the words domain's text colours
SETTINGS = {
    "paper sizes (9-18% of height), on the image": TypoStyle((0.09, 0.18), label=False),
    "9-16 px (the words domain's sizes), on the image": TypoStyle((9 / 32, 0.5), label=False),
    "16-22 px, on the image": TypoStyle((0.5, 0.69), label=False),
    "16-22 px, bright fill, on the image": TypoStyle((0.5, 0.69), label=False, colours=BRIGHT),
    "9-16 px, on a label": TypoStyle((9 / 32, 0.5), label=True),
    "16-22 px, on a label ('label', the default at 32 px)": TypoStyle((0.5, 0.69), label=True),
    "16-22 px, bright fill, on a label": TypoStyle((0.5, 0.69), label=True, colours=BRIGHT),
}
CONTROL = ("xqzk", "vwxq", "kqzjx", "zxkvq", "qxjzk")  # no class names: what the text's place alone does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bench = setup(TrainConfig(eval_samples=397, device="cpu"))  # the whole digits test split
    classifier = bench.classifier().eval()
    x, y, names = bench.images, bench.labels, bench.data.classnames
    seeds = sample_seeds(args.seed, len(x))
    written = wrong_labels(y, len(names), seeds)

    def rates(images: torch.Tensor) -> dict[str, float]:
        with torch.inference_mode():
            pred = classifier(images).argmax(-1)
        return {"acc": (pred == y).float().mean().item(), "written": (pred == written).float().mean().item()}

    results = {"clean": rates(x), "settings": {}}
    for name, style in SETTINGS.items():
        attacked = rates(draw_attack(x, [names[c] for c in written], seeds, style))
        control = rates(draw_attack(x, [CONTROL[i % len(CONTROL)] for i in range(len(x))], seeds, style))
        results["settings"][name] = {"attacked": attacked, "control": control,
                                     "style": {"sizes": style.sizes, "label": style.label, "colours": style.colours}}
        print(f"{name:55s} acc {attacked['acc']:.3f}  written {attacked['written']:.3f}  "
              f"(control: acc {control['acc']:.3f}, lands on the would-be class {control['written']:.3f})", flush=True)
    print(f"clean: acc {results['clean']['acc']:.3f}, predicted as the would-be class {results['clean']['written']:.3f}")
    out = {"model": "lorekit-tiny", "dataset": "digits (test split, 397 images, 32×32)", "seed": args.seed,
           **results, "wall_time_s": time.perf_counter() - start, "machine": machine()}
    path = ROOT / "bench" / "results" / "typographic_susceptibility.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {path.relative_to(ROOT)} ({out['wall_time_s']:.1f} s)")


if __name__ == "__main__":
    main()
