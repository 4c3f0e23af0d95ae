"""torchrun worker: extract an image folder into a sharded cache with an encoder that can die midway.

Usage: extract_worker.py IMAGES CACHE SHARD_SIZE REPORT [KILL_RANK KILL_AT_CALL]
Each rank appends "rank images_encoded" to REPORT.RANK. With KILL_RANK, that rank SIGKILLs itself at its
KILL_AT_CALL-th encoder call, the way an out-of-memory kill or a lost node ends a process.
"""

import os
import signal
import sys

import torch
from torchvision import transforms

from promptkit import distributed
from promptkit.data import ImageFolderSource, extract_features


class MeanColourEncoder:
    """Features = per-channel mean of each image (exact whatever the batch), like tests/data's FakeClip."""

    name = "mean-colour"
    fingerprint = "mean-colour-v1"

    def __init__(self, kill_at: int | None) -> None:
        self.preprocess = transforms.Compose([transforms.Resize(4), transforms.CenterCrop(4), transforms.ToTensor()])
        self.kill_at = kill_at
        self.calls = self.images = 0

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.images += len(x)
        return x.mean(dim=(2, 3))


def main() -> None:
    images, cache, shard_size, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    distributed.init_distributed()
    me = distributed.rank()
    kill_at = int(sys.argv[6]) if len(sys.argv) > 6 and int(sys.argv[5]) == me else None
    encoder = MeanColourEncoder(kill_at)
    extract_features(encoder, ImageFolderSource(images), batch_size=2, cache_dir=cache, progress=False,
                     shard_size=shard_size)
    with open(f"{report}.{me}", "w") as handle:
        handle.write(f"{me} {encoder.images}\n")
    distributed.close_distributed()


if __name__ == "__main__":
    main()
