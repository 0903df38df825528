"""Which 15 of SmolLM2's 30 layers to keep: perplexity of untrained layer-kept students on the Wikipedia
validation split (the test split stays reserved for the a-d comparison). Results: results/distill/layer_choice.json.

    flock /tmp/compress-heavy.lock python -m studies.distill_layer_choice
"""
from __future__ import annotations

import json

from compress.data import DataSpec, load_dataset, lm_windows
from compress.distill.students import keep_layers, resolve_keep
from compress.models import load_model
from compress.runtime import set_threads

from studies.distill_common import RESULTS, lm_quality, machine

CANDIDATES = {
    "even15": resolve_keep(15, 30),
    "every_other": list(range(0, 30, 2)),
    "first12+last3": list(range(12)) + [27, 28, 29],
    "first10+last5": list(range(10)) + list(range(25, 30)),
    "first13+last2": list(range(13)) + [28, 29],
    "first8+last7": list(range(8)) + list(range(23, 30)),
}


def main() -> None:
    threads = set_threads(1)
    teacher, tok = load_model("builtin:smollm2-135m", "causal-lm")
    wiki = lm_windows(tok, load_dataset(DataSpec(source="builtin:wikipedia", split="validation"), "eval"), 256, 1024)
    out = {name: {"kept_layers": keep, **lm_quality(keep_layers(teacher, keep), wiki)}
           for name, keep in CANDIDATES.items()}
    out["_about"] = {"what": "untrained students, perplexity on the Wikipedia validation split",
                     "machine": machine(threads)}
    (RESULTS / "layer_choice.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
