"""torchrun worker (or plain process): fit CoOp, LSN and NegPrompt on fixed random features, save the prompts.

Usage: train_worker.py OUT
Every rank trains; rank 0 writes OUT/<method>.safetensors with the learned contexts and the loss history, and
every rank writes OUT/rows.<rank>.json: how many prompts its text encoder ran per method (to show the split).
Run without torchrun it is the single-process reference.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from promptkit import distributed
from promptkit.clip import load_clip
from promptkit.methods import METHODS

SETTINGS = {
    "coop": dict(n_ctx=4, epochs=3, batch_size=4, warmup_epochs=0),
    "lsn": dict(n_ctx=4, pos_epochs=2, pos_batch_size=4, n_neg_ctx=4, n_sets=2, neg_epochs=2, neg_batch_size=5),
    "negprompt": dict(pos_epochs=2, pos_batch_size=4, n_neg=2, neg_epochs=2, neg_batch_size=4),
}


def main() -> None:
    out = Path(sys.argv[1])
    distributed.init_distributed()
    clip = load_clip()  # the embedded promptkit-tiny model
    names = ["t-shirt", "pullover", "dress", "coat", "bag"]  # C = 5: uneven class slices over 2 ranks
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(13, clip.embed_dim, generator=generator)  # 13 images: the last batches split unevenly
    labels = torch.arange(13) % len(names)
    rows = {}
    for name, settings in SETTINGS.items():
        method = METHODS[name](clip, names, METHODS[name].Config(**settings))
        counted = [0]
        for learner in {id(m.encoder): m.encoder for m in vars(method).values() if hasattr(m, "encoder")}.values():
            learner.register_forward_hook(lambda module, args, output: counted.__setitem__(0, counted[0] + len(output)))
        method.fit(features, labels, progress=False)
        rows[name] = counted[0]
        tensors = {k: v.detach().contiguous() for k, v in method.state().items()}
        losses = [x for v in method.info.values() if isinstance(v, list) for x in _flat(v)]
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        if distributed.is_main():
            save_file(tensors, str(out / f"{name}.safetensors"))
    (out / f"rows.{distributed.rank()}.json").write_text(json.dumps(rows))
    distributed.close_distributed()


def _flat(values):
    for v in values:
        yield from (_flat(v) if isinstance(v, list) else [v])


if __name__ == "__main__":
    main()
